import pytest
import torch

from lorakit import LoraConfig, adapter_state_dict, inject_lora
from lorakit.generation import Engine, Request, SamplingParams
from lorakit.models import build_demo_tokenizer

from .models import randomize_lora, tiny_qwen3


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


@pytest.fixture
def model():
    m = tiny_qwen3(vocab=320)
    for i, name in enumerate(("math", "code")):
        inject_lora(m, LoraConfig(r=4, alpha=8, target_modules="all-linear"), adapter_name=name)
        randomize_lora(m, seed=10 + i, scale=0.3)
    return m


def _ids(tok, text):
    return tok(text)["input_ids"]


PROMPTS = [("2+2=", "math"), ("def f(x):", "code"), ("Hello there, how", None), ("x", "math")]


def test_mixed_batch_rows_equal_each_row_alone(model, tok):
    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    batch = engine.generate([Request(_ids(tok, p), a, params) for p, a in PROMPTS])
    for (prompt, adapter), got in zip(PROMPTS, batch):
        alone = engine.generate([Request(_ids(tok, prompt), adapter, params)])[0]
        assert got.token_ids == alone.token_ids, (prompt, adapter)
        assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert got.finish_reason == "length" and len(got.token_ids) == 8
    # the adapters really differ: same prompt, different adapters, different continuations
    outs = {a: engine.generate([Request(_ids(tok, "2+2="), a, params)])[0].token_ids for a in ("math", "code", None)}
    assert len({tuple(v) for v in outs.values()}) == 3


def test_mixed_batch_greedy_equals_transformers_generate_with_peft(model, tok):
    """Oracle: transformers' own ``generate`` on the same base with each adapter put in by ``peft``."""
    peft = pytest.importorskip("peft")
    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    mixed = engine.generate([Request(_ids(tok, p), a, params) for p, a in PROMPTS])
    one_adapter = [(p, a) for p, a in PROMPTS if a == "math"]  # one LoRA pass, not the gathered one
    single = engine.generate([Request(_ids(tok, p), a, params) for p, a in one_adapter])
    references = {None: tiny_qwen3(vocab=320)}
    for name in ("math", "code"):
        ref = peft.get_peft_model(tiny_qwen3(vocab=320), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        loaded = peft.set_peft_model_state_dict(ref, adapter_state_dict(model, name))
        assert not loaded.unexpected_keys
        references[name] = ref.eval()
    for (prompt, adapter), got in zip(PROMPTS + one_adapter, mixed + single):
        ids = torch.tensor([_ids(tok, prompt)])
        with torch.no_grad():
            want = references[adapter].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                max_new_tokens=8, min_new_tokens=8)[0, ids.shape[1]:].tolist()
        assert got.token_ids == want, (prompt, adapter)


def test_logprobs_equal_a_full_forward_of_the_completion(model, tok):
    engine = Engine(model, tok)
    prompt = _ids(tok, "The answer is")
    out = engine.generate([Request(prompt, "math", SamplingParams(max_new_tokens=6, temperature=1.0, seed=3,
                                                                 ignore_eos=True))])[0]
    from lorakit import set_active_adapters

    set_active_adapters(model, ["math"])
    with torch.no_grad():
        full = torch.tensor([prompt + out.token_ids])
        logp = torch.log_softmax(model(full).logits[0].float(), -1)
    expected = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-5)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model, tok):
    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = engine.generate([Request(_ids(tok, "once upon"), "code", params)])[0]
    again = engine.generate([Request(_ids(tok, "zz"), "math", SamplingParams(temperature=1.0, seed=1, max_new_tokens=4)),
                             Request(_ids(tok, "once upon"), "code", params)])[1]
    assert again.token_ids == alone.token_ids
    other = engine.generate([Request(_ids(tok, "once upon"), "code",
                                     SamplingParams(max_new_tokens=10, temperature=0.9, seed=8, ignore_eos=True))])[0]
    assert other.token_ids != alone.token_ids


def test_stop_strings_and_streaming_match_the_final_text(model, tok):
    engine = Engine(model, tok)
    greedy = engine.generate([Request(_ids(tok, "abc"), "math", SamplingParams(max_new_tokens=12, ignore_eos=True))])[0]
    assert len(greedy.text) > 4
    stop = greedy.text[3:5]
    stopped = engine.generate([Request(_ids(tok, "abc"), "math", SamplingParams(max_new_tokens=12, stop=[stop],
                                                                               ignore_eos=True))])[0]
    assert stopped.finish_reason == "stop" and stopped.text == greedy.text[:greedy.text.find(stop)]
    pieces: dict[int, str] = {0: "", 1: ""}
    finish = {}
    requests = [Request(_ids(tok, "abc"), "math", SamplingParams(max_new_tokens=12, stop=[stop], ignore_eos=True)),
                Request(_ids(tok, "你好"), "code", SamplingParams(max_new_tokens=9, ignore_eos=True))]
    for deltas in engine.stream(requests):
        for d in deltas:
            pieces[d.row] += d.text
            if d.finish_reason:
                finish[d.row] = d.finish_reason
    final = engine.generate(requests)
    assert pieces[0] == final[0].text and pieces[1] == final[1].text
    assert finish == {0: "stop", 1: "length"}


def test_update_adapter_in_place_changes_outputs_without_new_modules(model, tok):
    engine = Engine(model, tok)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    request = Request(_ids(tok, "2+2="), "math", params)
    before = engine.generate([request])[0].token_ids
    modules_before = [id(m) for m in model.modules()]
    new = {k: v * 0 for k, v in adapter_state_dict(model, "math").items()}  # zeroed adapter = the base
    engine.update_adapter("math", new)
    assert [id(m) for m in model.modules()] == modules_before
    after = engine.generate([request])[0].token_ids
    base = engine.generate([Request(_ids(tok, "2+2="), None, params)])[0].token_ids
    assert after == base and after != before
    with pytest.raises(ValueError, match="shape mismatch"):
        engine.update_adapter("math", {k: v[:1] for k, v in new.items()})


def test_unknown_adapter_is_an_error(model, tok):
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        Engine(model, tok).generate([Request(_ids(tok, "x"), "nope")])


def test_rows_sharing_a_prompt_share_one_prefill(model, tok):
    """n completions of one prompt (GRPO groups, OpenAI's n): the prompt runs through the model
    once per adapter, and every row samples as it would alone."""
    prompts = [("2+2=", "math"), ("def f(x):", "code"), ("2+2=", None)]
    requests = [Request(_ids(tok, p), a, SamplingParams(max_new_tokens=6, temperature=1.0, seed=100 * i + k, ignore_eos=True))
                for i, (p, a) in enumerate(prompts) for k in range(4)]
    requests.append(Request(_ids(tok, "2+2="), "code", SamplingParams(max_new_tokens=6, ignore_eos=True)))  # other adapter
    engine = Engine(model, tok)
    batch = engine.generate(requests)
    width = max(len(_ids(tok, p)) for p, _ in prompts)
    assert engine.prefill_tokens == 4 * width  # 4 distinct (prompt, adapter) pairs of 13 rows, left-padded
    for request, got in zip(requests, batch):
        alone = Engine(model, tok)
        solo = alone.generate([request])[0]
        assert alone.prefill_tokens == len(request.prompt_ids)
        assert got.token_ids == solo.token_ids, (request.adapter, request.params.seed)
        assert got.logprobs == pytest.approx(solo.logprobs, abs=1e-4)
