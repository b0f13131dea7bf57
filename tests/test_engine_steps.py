"""Step-level batching: rows join and leave the running batch between decode steps.

Oracle: transformers' own ``generate`` on each prompt alone, with its adapter put in by the real
``peft`` and merged, for Qwen3, Llama and Qwen2 shapes with grouped-query attention.
"""

import threading

import pytest
import torch

from lorakit import LoraConfig, adapter_state_dict, inject_lora
from lorakit.generation import Engine, Request, SamplingParams
from lorakit.models import build_demo_tokenizer

from .models import randomize_lora

peft = pytest.importorskip("peft")
VOCAB = 320


def _base(family: str, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    if family == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=8, **common)).eval()
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**common)).eval()
    return T.Qwen2ForCausalLM(T.Qwen2Config(**common)).eval()


def _with_adapters(family: str):
    model = _base(family)
    for i, name in enumerate(("math", "code")):
        inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), adapter_name=name)
        randomize_lora(model, seed=20 + i, scale=0.3)
    return model


def _oracle(family: str, model, adapter, prompt: list[int], n: int) -> list[int]:
    ref = _base(family)
    if adapter is not None:
        ref = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        assert not peft.set_peft_model_state_dict(ref, adapter_state_dict(model, adapter)).unexpected_keys
        ref = ref.merge_and_unload().eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


def _run(engine: Engine) -> dict[int, list]:
    """Step until idle; returns each request id's Completion and the step at which it finished."""
    done, step = {}, 0
    while engine.has_unfinished():
        step += 1
        for delta in engine.step():
            if delta.completion is not None:
                done[delta.row] = (delta.completion, step)
    return done


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_rows_joining_mid_flight_with_chunked_prefill_match_transformers(family, tok):
    model = _with_adapters(family)
    engine = Engine(model, tok, prefill_chunk=7)  # prompts of 12+ tokens are prefilled over several steps
    jobs = [("Once upon a time there was a", "math", 20), ("2+2=", "code", 6), ("A much longer prompt that "
            "needs several prefill chunks before it can decode", None, 9), ("def f(x):", "math", 5)]
    ids = {}
    ids[0] = engine.add_request(Request(tok(jobs[0][0])["input_ids"], jobs[0][1], SamplingParams(jobs[0][2], ignore_eos=True)))
    while not engine._running:  # the first row is decoding when the others arrive
        engine.step()
    for j, (prompt, adapter, n) in enumerate(jobs[1:], start=1):
        ids[j] = engine.add_request(Request(tok(prompt)["input_ids"], adapter, SamplingParams(n, ignore_eos=True)))
        engine.step()
    done = _run(engine)
    assert engine.largest_batch >= 3
    for j, (prompt, adapter, n) in enumerate(jobs):
        want = _oracle(family, model, adapter, tok(prompt)["input_ids"], n)
        assert done[ids[j]][0].token_ids == want, (family, j)
    # the short request that arrived while the long one was decoding finished first
    assert done[ids[1]][1] < done[ids[0]][1]


def test_abort_frees_the_slot_and_the_rest_go_on(tok):
    model = _with_adapters("qwen3")
    engine = Engine(model, tok, max_num_seqs=2)
    params = SamplingParams(12, ignore_eos=True)
    a = engine.add_request(Request(tok("first")["input_ids"], "math", params))
    b = engine.add_request(Request(tok("second one")["input_ids"], "code", params))
    c = engine.add_request(Request(tok("third")["input_ids"], None, params))
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 1)
    width = engine._batch.width
    assert engine.abort(b) and not engine.abort(b)
    assert engine._batch.rows == 1 and engine._batch.width < width  # row and its padding gone
    engine.step()  # the waiting request takes the freed slot
    assert (engine.num_running, engine.num_waiting) == (2, 0)
    done = _run(engine)
    assert set(done) == {a, c}
    alone = Engine(model, tok).generate([Request(tok("third")["input_ids"], None, params)])[0]
    assert done[c][0].token_ids == alone.token_ids


def test_prefill_computes_logits_for_the_last_position_only(tok):
    model = _with_adapters("qwen3")
    shapes = []
    model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    engine = Engine(model, tok, prefill_chunk=16)
    engine.generate([Request(list(range(5, 45)), "math", SamplingParams(3, ignore_eos=True)),
                     Request(list(range(9, 19)), None, SamplingParams(3, ignore_eos=True))])
    assert shapes and all(s[1] == 1 for s in shapes), shapes  # (rows, 1, vocab), never (rows, tokens, vocab)


def test_lockstep_ranks_make_the_same_number_of_forwards(tok):
    """Three 'ranks' (threads) with different amounts of work, one with none; the lockstep callback
    is an OR-reduce over them."""
    barrier = threading.Barrier(3)
    flags = [False, False, False]

    def make_lockstep(rank):
        def lockstep(mine: bool) -> bool:
            flags[rank] = mine
            barrier.wait()
            anyone = any(flags)
            barrier.wait()
            return anyone
        return lockstep

    model = _with_adapters("qwen3")
    counts, results = [0, 0, 0], [None, None, None]
    work = [[Request(tok("a long one")["input_ids"], "math", SamplingParams(15, ignore_eos=True)),
             Request(tok("b")["input_ids"], "code", SamplingParams(4, ignore_eos=True))],
            [Request(tok("short")["input_ids"], None, SamplingParams(2, ignore_eos=True))], []]

    def rank(r):
        local = _with_adapters("qwen3")  # each rank its own model, so forwards are counted per rank
        local.load_state_dict(model.state_dict())

        def count(*_):
            counts[r] += 1
        local.model.register_forward_hook(count)
        results[r] = Engine(local, tok, lockstep=make_lockstep(r)).generate(work[r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert counts[0] == counts[1] == counts[2] > 3
    assert results[2] == []
    alone = Engine(model, tok).generate(work[0] + work[1])
    assert [c.token_ids for c in results[0] + results[1]] == [c.token_ids for c in alone]


def test_per_row_seeds_do_not_depend_on_when_a_row_joins(tok):
    model = _with_adapters("qwen3")
    params = SamplingParams(10, temperature=0.8, top_k=40, top_p=0.9, seed=5, ignore_eos=True)
    alone = Engine(model, tok).generate([Request(tok("seeded")["input_ids"], "code", params)])[0].token_ids
    engine = Engine(model, tok)
    engine.add_request(Request(tok("busy row")["input_ids"], "math", SamplingParams(20, temperature=1.0, ignore_eos=True)))
    engine.step()
    engine.step()
    late = engine.add_request(Request(tok("seeded")["input_ids"], "code", params))
    assert _run(engine)[late][0].token_ids == alone
