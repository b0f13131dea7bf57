"""The engine's ``lockstep`` hook (FSDP2: every forward is a collective, so all ranks step the decode
loop together): its contract, checked on one process with a scripted stand-in for the all-reduce."""

from lorakit.generation import Engine, Request, SamplingParams
from lorakit.models import build_demo_tokenizer

from .models import tiny_qwen3


def _forwards(model):
    calls = []
    model.register_forward_hook(lambda _m, args, kwargs, _out: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    return calls


def test_a_rank_with_finished_rows_keeps_stepping_while_others_are_busy():
    tok = build_demo_tokenizer()
    model = tiny_qwen3(vocab=320)
    requests = [Request(tok("2+2=")["input_ids"], None, SamplingParams(max_new_tokens=3, ignore_eos=True)),
                Request(tok("Hello")["input_ids"], None, SamplingParams(max_new_tokens=2, ignore_eos=True))]
    alone = Engine(model, tok).generate(requests)

    seen = []
    extra = 4  # another rank needs 4 more decode steps after this one's rows are done

    def lockstep(busy):
        seen.append(busy)
        return busy or sum(1 for b in seen if not b) <= extra

    calls = _forwards(model)
    together = Engine(model, tok, lockstep=lockstep).generate(requests)
    # Same completions; lockstep called once per forward's tokens (prefill + each decode step).
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.finish_reason for c in together] == ["length", "length"]
    assert seen == [True, True, False, False, False, False, False]
    assert len(calls) == len(seen)  # the prefill, then one decode forward after every True
    assert calls[0][0] == 2 and all(shape == (2, 1) for shape in calls[1:])


def test_a_rank_with_no_requests_runs_one_dummy_row_and_returns_nothing():
    tok = build_demo_tokenizer()
    model = tiny_qwen3(vocab=320)
    answers = iter([True, True, False])
    calls = _forwards(model)
    assert Engine(model, tok, lockstep=lambda busy: next(answers)).generate([]) == []
    assert len(calls) == 3 and calls[0] == (1, 1)
    assert Engine(model, tok).generate([]) == []  # without lockstep: no forward at all
    assert len(calls) == 3


def test_zero_new_tokens_samples_nothing():
    tok = build_demo_tokenizer()
    model = tiny_qwen3(vocab=320)
    out = Engine(model, tok).generate([Request(tok("hi")["input_ids"], None, SamplingParams(max_new_tokens=0))])
    assert out[0].token_ids == [] and out[0].finish_reason == "length"
