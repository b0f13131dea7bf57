"""The engine's KV cache writes per decode step grow with the rows, never with the history.

Oracle: a ``TorchDispatchMode`` sees every aten op of a step; the bytes an op writes are counted
when its output lives in the storage of one of the cache's key/value buffers (found after the
step), and compared with what the model's shapes say one token per row takes: layers x (keys +
values) x kv_heads x head_dim x 4 bytes. Outputs stay those of each request decoded alone.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit.generation import Engine, Request, SamplingParams
from lorakit.models import build_demo_tokenizer

from .models import tiny_qwen3

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 8
TOKEN_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # one token of one row, keys + values, fp32


class _Writes(TorchDispatchMode):
    """Records (storage pointer, bytes written) of every aten op that writes a tensor."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view:  # aliases its input, writes nothing
            return out
        if name.endswith("_") and args and isinstance(args[0], torch.Tensor):  # in place: what it wrote
            target = args[0]
            size = args[2].numel() if name == "index_put_" else target.numel()
            self.writes.append((target.untyped_storage().data_ptr(), size * target.element_size()))
        else:
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.numel():
                    self.writes.append((t.untyped_storage().data_ptr(), t.numel() * t.element_size()))
        return out


def _cache_storages(engine):
    batch = engine._batch
    return {t.untyped_storage().data_ptr() for t in (*batch.keys, *batch.values)}


def _step_bytes(engine):
    """Run one engine step; bytes it wrote into the cache's buffers."""
    with _Writes() as mode:
        engine.step()
    mine = _cache_storages(engine)
    return sum(n for ptr, n in mode.writes if ptr in mine)


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny_qwen3(vocab=320)
    assert (m.config.num_hidden_layers, m.config.num_key_value_heads, m.config.head_dim) == (LAYERS, KV_HEADS, HEAD_DIM)
    return m.eval()


def _requests(tok, n, new_tokens):
    return [Request(tok(f"row {i} says")["input_ids"], None, SamplingParams(new_tokens, ignore_eos=True))
            for i in range(n)]


def _history(engine):
    return engine._batch.width


def test_a_decode_step_at_history_512_writes_what_a_step_at_16_writes(model, tok):
    rows = 4
    requests = _requests(tok, rows, 530)
    # A token budget reserves each row's room when it joins, so no decode step grows the cache.
    engine = Engine(model, tok, max_num_batched_tokens=rows * 600)
    for r in requests:
        engine.add_request(r)
    engine.step()  # prefill + join + first decode step
    assert engine._batch.rows == rows
    at = {}
    while engine.has_unfinished() and _history(engine) <= 512:
        history = _history(engine)
        if history in (16, 512):
            at[history] = _step_bytes(engine)
        else:
            engine.step()
    assert set(at) == {16, 512}
    assert at[512] <= at[16] == rows * TOKEN_BYTES, at


def test_without_a_budget_the_cache_grows_geometrically(model, tok):
    """Growth copies the rows in use, but only O(log history) steps do it."""
    rows, steps = 3, 200
    engine = Engine(model, tok)
    for r in _requests(tok, rows, steps + 5):
        engine.add_request(r)
    engine.step()
    sizes = [_step_bytes(engine) for _ in range(steps)]
    plain = rows * TOKEN_BYTES
    bigger = [i for i, n in enumerate(sizes) if n > plain]
    assert min(sizes) == plain
    assert len(bigger) <= math.ceil(math.log2(steps + 16)), bigger


def test_a_row_leaving_moves_at_most_one_row_and_a_join_copies_only_its_prompt(model, tok):
    engine = Engine(model, tok)
    ids = [engine.add_request(r) for r in _requests(tok, 4, 200)]
    engine.step()
    for _ in range(100):
        engine.step()
    history = _history(engine)
    with _Writes() as mode:
        engine.abort(ids[0])  # the last row moves into its slot
    mine = _cache_storages(engine)
    moved = sum(n for ptr, n in mode.writes if ptr in mine)
    assert 0 < moved <= history * TOKEN_BYTES
    with _Writes() as mode:
        engine.abort(ids[2])  # the last row now: nothing moves
    mine = _cache_storages(engine)
    assert sum(n for ptr, n in mode.writes if ptr in mine) == 0
    late = Request(tok("a late row joins")["input_ids"], None, SamplingParams(5, ignore_eos=True))
    engine.add_request(late)
    joined = _step_bytes(engine)  # its prefill copied in, then one decode step for all 3 rows
    assert joined == len(late.prompt_ids) * TOKEN_BYTES + 3 * TOKEN_BYTES
    done = {}
    while engine.has_unfinished():
        for d in engine.step():
            if d.completion is not None:
                done[d.row] = d.completion
    alone = Engine(model, tok).generate([late])[0]
    assert done[ids[-1] + 1].token_ids == alone.token_ids


def test_outputs_match_solo_generation_across_joins_leaves_and_growth(model, tok):
    prompts = [tok(t)["input_ids"] for t in ("a", "a longer prompt than the first one", "mid size", "x y z w")]
    lengths = [40, 3, 25, 60]
    requests = [Request(p, None, SamplingParams(n, ignore_eos=True)) for p, n in zip(prompts, lengths)]
    engine = Engine(model, tok, max_num_seqs=3)  # the fourth joins when the second leaves
    batch = engine.generate(requests)
    for r, got in zip(requests, batch):
        alone = Engine(model, tok).generate([r])[0]
        assert got.token_ids == alone.token_ids
        assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_token_budget_admits_what_fits_and_refuses_what_never_can(model, tok):
    prompt = tok("row says")["input_ids"]
    engine = Engine(model, tok, max_num_batched_tokens=3 * (len(prompt) + 10))
    for _ in range(5):
        engine.add_request(Request(prompt, None, SamplingParams(10, ignore_eos=True)))
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (3, 2)  # 3 rows x (prompt + 10) fill the budget
    refused = r"the prompt has \d+ tokens; with max_new_tokens=100 .*max_num_batched_tokens"
    with pytest.raises(ValueError, match=refused):
        engine.add_request(Request(prompt, None, SamplingParams(100)))
    while engine.has_unfinished():
        engine.step()
    assert engine.largest_batch == 3


def test_sliding_window_models_are_refused_by_name(tok):
    import transformers as T

    cfg = T.Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                        max_window_layers=1)
    with pytest.raises(ValueError, match="full-attention layers only.*sliding_attention"):
        Engine(T.Qwen2ForCausalLM(cfg), tok)


def test_no_future_warning_from_the_engine_forward(model, tok):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        Engine(model, tok).generate(_requests(tok, 2, 3))


def test_moe_demo_batch_matches_transformers_generate(tok):
    from lorakit.models.demo import build_demo_moe_model

    moe = build_demo_moe_model(320).eval()
    prompts = [tok(t)["input_ids"] for t in ("mixture", "of experts in one batch", "rows")]
    requests = [Request(p, None, SamplingParams(n, ignore_eos=True)) for p, n in zip(prompts, (12, 4, 9))]
    got = Engine(moe, tok).generate(requests)
    for r, completion in zip(requests, got):
        ids = torch.tensor([r.prompt_ids])
        with torch.no_grad():
            want = moe.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=r.params.max_new_tokens, min_new_tokens=r.params.max_new_tokens)
        assert completion.token_ids == want[0, ids.shape[1]:].tolist()
