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

    seen, answers = [], []
    extra = 4  # another rank needs 4 more decode steps after this one's rows are done

    def lockstep(busy):
        seen.append(busy)
        answers.append(busy or sum(1 for b in seen if not b) <= extra)
        return answers[-1]

    calls = _forwards(model)
    together = Engine(model, tok, lockstep=lockstep).generate(requests)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.finish_reason for c in together] == ["length", "length"]
    # One forward for every step some rank needed, and none once no rank does: the forward count
    # (what FSDP2's collectives must agree on) is the all-reduce's, not this rank's own.
    assert len(calls) == sum(answers) and answers[-1] is False
    # This rank's rows were done after 3 forwards (prefill + 2 decode steps); it then made `extra`
    # dummy one-token forwards while the other rank was busy.
    assert seen == [True] * 3 + [False] * (extra + 1)
    assert calls[0][0] == 2 and calls[1:3] == [(2, 1), (1, 1)] and calls[3:] == [(1, 1)] * extra


def test_a_rank_with_no_requests_runs_one_dummy_row_and_returns_nothing():
    tok = build_demo_tokenizer()
    model = tiny_qwen3(vocab=320)
    answers = iter([True, True, False])
    calls = _forwards(model)
    assert Engine(model, tok, lockstep=lambda busy: next(answers)).generate([]) == []
    assert calls == [(1, 1)] * 2  # a dummy one-token forward for each step another rank needed
    assert Engine(model, tok).generate([]) == []  # without lockstep: no forward at all
    assert len(calls) == 2


def test_zero_new_tokens_samples_nothing():
    tok = build_demo_tokenizer()
    model = tiny_qwen3(vocab=320)
    out = Engine(model, tok).generate([Request(tok("hi")["input_ids"], None, SamplingParams(max_new_tokens=0))])
    assert out[0].token_ids == [] and out[0].finish_reason == "length"
