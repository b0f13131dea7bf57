"""A step that fails for one request fails that request only (issue 25 item 3).

The engine runs every row of a step in one forward; when that forward raises, it retries the
rows in halves down to single rows, and only the rows that fail alone end. The oracle for the
others is the same engine running each request alone: greedy rows give the same tokens, seeded
rows the same samples. The failures are real bad inputs handed to the engine directly (past the
server's checks, as an embedding program or an RL recipe does): a prompt token id outside the
vocabulary (fails a batched prefill) and a row that runs past GPT-2's position table (fails a
batched decode step). A failure nothing can recover from (a CUDA error) stops the engine.
"""

import pytest
import torch

from lorakit import LoraConfig, inject_lora
from lorakit.generation import Engine, EngineBroken, Request, RequestFailed, SamplingParams
from lorakit.models import build_demo_tokenizer

from .models import Poisoned, randomize_lora


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


def _qwen3(vocab: int):
    import transformers as T

    torch.manual_seed(0)
    model = T.Qwen3ForCausalLM(T.Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False)).eval()
    return _adapters(model)


def _gpt2(vocab: int, positions: int):
    import transformers as T

    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab, n_positions=positions,
                                           bos_token_id=0, eos_token_id=0)).eval()
    return _adapters(model)


def _adapters(model):
    for i, name in enumerate(("math", "code")):
        inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), adapter_name=name)
        randomize_lora(model, seed=20 + i, scale=0.3)
    return model


def _drive(engine: Engine, requests: dict, before_step=None) -> tuple[dict, dict]:
    """Add ``requests`` (key -> Request), step until idle; returns key -> Completion, key -> RequestFailed."""
    ident = {engine.add_request(r): k for k, r in requests.items()}
    done, failed, step = {}, {}, 0
    while engine.has_unfinished():
        if before_step is not None:
            ident.update({engine.add_request(r): k for k, r in before_step(step, failed).items()})
        step += 1
        for delta in engine.step():
            if delta.error is not None:
                assert delta.finish_reason == "error" and delta.completion is None
                failed[ident[delta.row]] = delta.error
            elif delta.completion is not None:
                done[ident[delta.row]] = delta.completion
    return done, failed


def _alone(model, tok, request: Request) -> list[int]:
    return Engine(model, tok).generate([request])[0].token_ids


def test_a_bad_prompt_in_a_batched_prefill_fails_alone_and_the_others_match_their_solo_runs(tok):
    vocab = len(tok)
    model = _qwen3(vocab)
    engine = Engine(model, tok)
    requests = {
        "a": Request(tok("Once upon a time")["input_ids"], "math", SamplingParams(8, ignore_eos=True)),
        "bad": Request([5, 6, vocab + 3, 7], None, SamplingParams(8, ignore_eos=True)),
        "c": Request(tok("def f(x):")["input_ids"], "code", SamplingParams(8, ignore_eos=True)),
        "seeded": Request(tok("2+2=")["input_ids"], "math", SamplingParams(8, temperature=1.0, seed=7, ignore_eos=True)),
        "d": Request(tok("Hello there")["input_ids"], None, SamplingParams(6, ignore_eos=True)),
    }
    done, failed = _drive(engine, requests)  # all five are prefilled together in the first step
    assert set(failed) == {"bad"} and set(done) == {"a", "c", "seeded", "d"}
    err = failed["bad"]
    assert isinstance(err, RequestFailed) and err.client_fault and isinstance(err.cause, IndexError)
    assert f"token id {vocab + 3}" in str(err) and "'prompt'" in str(err), err
    for key, completion in done.items():
        assert completion.token_ids == _alone(model, tok, requests[key]), key
    assert not engine.has_unfinished() and engine._batch.rows == 0


def test_a_row_failing_mid_decode_leaves_and_the_batch_decodes_on_as_if_alone(tok):
    """GPT-2's learned position table has 32 rows: the long row's decode step at position 32 raises
    an IndexError in the batched forward (the engine's checks do not know the table)."""
    model = _gpt2(len(tok), positions=32)
    engine = Engine(model, tok)
    requests = {
        "a": Request([5, 6, 7, 8], "math", SamplingParams(26, ignore_eos=True)),
        "long": Request(list(range(10, 30)), "code", SamplingParams(40, ignore_eos=True)),  # position 32 at step 12
        "seeded": Request([9, 10], None, SamplingParams(24, temperature=1.0, seed=3, ignore_eos=True)),
        "b": Request([11, 12, 13], "code", SamplingParams(20, ignore_eos=True)),
    }
    late = Request([14, 15, 16, 17, 18], "math", SamplingParams(10, ignore_eos=True))

    def join_after_the_failure(step, failed):  # a row joining afterwards decodes from a sound cache
        return {"late": late} if "long" in failed and step == 13 else {}

    done, failed = _drive(engine, requests, join_after_the_failure)
    assert set(failed) == {"long"} and set(done) == {"a", "seeded", "b", "late"}
    err = failed["long"]
    assert err.client_fault and "position 32" in str(err) and "config.n_positions" in str(err), err
    requests["late"] = late
    for key, completion in done.items():
        assert completion.token_ids == _alone(model, tok, requests[key]), key
    assert len(done["a"].token_ids) == 26  # it outlived the failure by many steps


def test_an_error_of_unknown_cause_fails_the_row_that_fails_alone_and_names_it(tok):
    model = _qwen3(len(tok))
    model.model.embed_tokens = Poisoned(model.model.embed_tokens, poison=42)
    requests = {k: Request(p, a, SamplingParams(6, ignore_eos=True)) for k, p, a in [
        ("a", [5, 6, 7], "math"), ("b", [8, 9], None), ("bad", [10, 42, 11], "code"), ("c", [12, 13, 14, 15], "code")]}
    done, failed = _drive(Engine(model, tok), requests)
    assert set(failed) == {"bad"}
    err = failed["bad"]
    assert not err.client_fault and "kernel failed" in str(err) and "adapter 'code'" in str(err), err
    for key, completion in done.items():
        assert completion.token_ids == _alone(model, tok, requests[key]), key
    with pytest.raises(RequestFailed, match=r"request 1 .*kernel failed"):  # generate() raises it, naming the list index
        Engine(model, tok).generate([requests["a"], requests["bad"]])


def test_a_cuda_error_is_not_retried_and_stops_the_engine(tok):
    model = _qwen3(len(tok))
    poisoned = model.model.embed_tokens = Poisoned(model.model.embed_tokens, poison=-1, error=torch.AcceleratorError)
    engine = Engine(model, tok)
    engine.add_request(Request([5, 6, 7], None, SamplingParams(20, ignore_eos=True)))
    engine.add_request(Request([8, 9], "math", SamplingParams(20, ignore_eos=True)))
    engine.step()
    calls = []
    model.model.register_forward_pre_hook(lambda *_: calls.append(1))
    poisoned.armed = True
    with pytest.raises(EngineBroken, match="AcceleratorError"):
        engine.step()
    assert len(calls) == 1  # no retry on a poisoned device
    poisoned.armed = False
    with pytest.raises(EngineBroken):  # and it stays stopped
        engine.step()
