"""A list of end-of-sequence ids (Qwen/Llama instruct: ``generation_config.eos_token_id = [a, b]``,
the tokenizer's eos being one of them): data labels, the engine, `generate`, `chat` and `serve` stop
on either. The oracle for stopping is transformers' own ``generate`` with that generation config.

The model is a tiny Qwen3 turned into a bigram machine: attention and MLP outputs are zeroed, so the
last hidden state is the current token's (normalised) embedding, and the head maps chosen tokens to
chosen next tokens. Each prompt's last token thus starts a known chain that ends in one eos id.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.data import IGNORE, Example, encode_example
from lorakit.generation import Engine, Request, SamplingParams
from lorakit.models import build_demo_tokenizer, load_model, load_tokenizer

# prompt end -> ... -> eos. "b" ends a plain prompt, "\n" ends every chat prompt, "r" a second plain one.
CHAINS = {"b": "cd<|im_end|>", "\n": "ok<|endoftext|>", "r": "st<|endoftext|>"}


def _id(tokenizer, text):
    ids = tokenizer.convert_tokens_to_ids([text]) if text.startswith("<|") else tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, text
    return ids[0]


def _pieces(chain):
    return re.findall(r"<\|[a-z_]+\|>|.", chain, flags=re.S)


def write_two_eos_model(path, head_dim=16):
    """Write the two-eos bigram model and its tokenizer to ``path`` (vLLM's CPU attention wants head_dim >= 32)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = build_demo_tokenizer()  # eos <|im_end|>, pad <|endoftext|>
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros_like(model.lm_head.weight)
        for start, chain in CHAINS.items():
            pieces = [start, *_pieces(chain)]
            for here, nxt in zip(pieces, pieces[1:]):
                head[_id(tok, nxt)] += 100 * emb[_id(tok, here)]
        model.lm_head.weight.copy_(head)
    im_end, endoftext = _id(tok, "<|im_end|>"), _id(tok, "<|endoftext|>")
    assert tok.eos_token_id == im_end
    model.config.eos_token_id = im_end  # as an instruct model's config.json has it: one id
    model.config.pad_token_id = endoftext
    model.generation_config.eos_token_id = [im_end, endoftext]
    model.generation_config.pad_token_id = endoftext
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def two_eos(tmp_path_factory):
    return write_two_eos_model(tmp_path_factory.mktemp("models") / "two-eos")


def _hf_greedy(path, prompt_ids, max_new_tokens=10):
    """transformers' generate with the saved generation config: the new tokens, eos included."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.generation_config.eos_token_id == [_id(load_tokenizer(str(path)), "<|im_end|>"),
                                                    _id(load_tokenizer(str(path)), "<|endoftext|>")]
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def _chat_ids(tok, text):
    from lorakit.data import render_chat

    return tok(render_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("prompt", ["ab", "qr", "chat"])
def test_the_engine_stops_on_either_eos_like_transformers(two_eos, prompt):
    tok = load_tokenizer(str(two_eos))
    model = load_model(str(two_eos)).eval()
    ids = _chat_ids(tok, "hi") if prompt == "chat" else tok(prompt, add_special_tokens=False)["input_ids"]
    expected = _hf_greedy(two_eos, ids)
    eos = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    assert expected[-1] in eos and len(expected) < 10  # transformers stopped on one of them
    if prompt != "ab":
        assert expected[-1] != tok.eos_token_id  # ... the one the tokenizer does not call its eos
    done = Engine(model, tok).generate([Request(ids, None, SamplingParams(max_new_tokens=10))])[0]
    assert done.finish_reason == "stop"
    assert done.token_ids + [done.stop_token_id] == expected
    assert done.text == tok.decode(expected[:-1])


def _lorakit(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def test_generate_and_chat_stop_on_the_second_eos(two_eos):
    tok = load_tokenizer(str(two_eos))
    expected = _hf_greedy(two_eos, _chat_ids(tok, "hi"))
    assert expected[-1] == tok.convert_tokens_to_ids("<|endoftext|>")
    reply = tok.decode(expected[:-1])
    assert reply == "ok"
    proc = _lorakit("generate", "--model", two_eos, "--prompt", "hi", "--max-new-tokens", "10")
    assert proc.returncode == 0 and proc.stdout == reply + "\n", proc.stdout + proc.stderr
    proc = _lorakit("chat", "--model", two_eos, "--max-new-tokens", "10", input="hi\nagain\n/exit\n")
    assert proc.returncode == 0 and proc.stdout.count(f"assistant> {reply}\n") == 2, proc.stdout + proc.stderr


def test_the_server_stops_on_either_eos(two_eos):
    openai = pytest.importorskip("openai")
    tok = load_tokenizer(str(two_eos))
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(two_eos), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert found, line + proc.stdout.read() if proc.poll() is not None else line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{found.group(1)}/v1", api_key="x")
        for prompt in ("ab", "qr"):
            expected = _hf_greedy(two_eos, tok(prompt, add_special_tokens=False)["input_ids"])
            got = client.completions.create(model="two-eos", prompt=prompt, max_tokens=10, temperature=0).choices[0]
            assert (got.text, got.finish_reason) == (tok.decode(expected[:-1]), "stop")
        expected = _hf_greedy(two_eos, _chat_ids(tok, "hi"))
        got = client.chat.completions.create(model="two-eos", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=10, temperature=0).choices[0]
        assert (got.message.content, got.finish_reason) == (tok.decode(expected[:-1]), "stop")
        stream = client.chat.completions.create(model="two-eos", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=10, temperature=0, stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# A template that is not prefix-consistent (its first line counts the messages), so assistant spans
# are found by content; turns end with <|im_end|>, while this tokenizer calls <|endoftext|> its eos
# (as Qwen base tokenizers do, their instruct generation config listing both).
COUNTING_TEMPLATE = (
    "{{ messages|length }}\n{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_chat_labels_end_with_whichever_eos_ends_the_turn():
    tok = build_demo_tokenizer()
    tok.eos_token = "<|endoftext|>"
    tok.chat_template = COUNTING_TEMPLATE
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Yo!"},
                {"role": "user", "content": "and?"}, {"role": "assistant", "content": "ok"}]
    enc = encode_example(tok, Example("x:1", messages=messages), 512, eos_token_ids=[im_end, endoftext])
    labelled = [t for t in enc.labels if t != IGNORE]
    # by hand: each assistant reply's bytes, then the end-of-turn token
    assert tok.convert_ids_to_tokens(labelled) == ["Y", "o", "!", "<|im_end|>", "o", "k", "<|im_end|>"]
    # the tokenizer's own eos still counts when no list is given (earlier behaviour)
    tok.eos_token = "<|im_end|>"
    plain = encode_example(tok, Example("x:1", messages=messages), 512)
    assert [t for t in plain.labels if t != IGNORE] == labelled


def test_text_samples_end_with_an_eos_from_the_list():
    tok = build_demo_tokenizer()
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    enc = encode_example(tok, Example("t:1", text="hi"), 64, eos_token_ids=[endoftext])
    assert enc.input_ids[-1] == tok.eos_token_id  # the tokenizer's eos comes first
    tok.eos_token = None
    enc = encode_example(tok, Example("t:1", text="hi"), 64, eos_token_ids=[endoftext])
    assert enc.input_ids == tok("hi")["input_ids"] + [endoftext]


def test_collect_eos_ids_takes_an_int_or_a_list_tokenizer_first():
    from transformers import GenerationConfig

    from lorakit.data import collect_eos_ids

    tok = build_demo_tokenizer()
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert collect_eos_ids(tok) == [im_end]
    assert collect_eos_ids(tok, GenerationConfig(eos_token_id=[endoftext, im_end])) == [im_end, endoftext]
    assert collect_eos_ids(tok, GenerationConfig(eos_token_id=endoftext)) == [im_end, endoftext]
    tok.eos_token = None
    assert collect_eos_ids(tok, GenerationConfig(eos_token_id=[endoftext, im_end])) == [endoftext, im_end]


@pytest.mark.parametrize("engine", ["local", "server"])
def test_grpo_rollouts_stop_on_the_second_eos_and_train_on_it(two_eos, tmp_path, engine):
    # Chat prompts end with "\n", whose chain is "ok<|endoftext|>": the eos the tokenizer does not
    # name. Stopping there and keeping the stop token gives 3 completion tokens, none truncated; an
    # engine that missed it would sample on (the head has nothing after it) up to max_new_tokens.
    import json

    import lorakit.recipes.grpo as grpo
    from lorakit.config import load_config

    body = {"recipe": "grpo", "model": str(two_eos), "output_dir": str(tmp_path / "run"),
            "data": {"train": str(Path(__file__).resolve().parents[1] / "examples" / "data" / "arith_rl.jsonl")},
            "lora": {"r": 4, "alpha": 8}, "grpo": {"prompts_per_step": 2},
            "rollout": {"engine": engine, "num_generations": 2, "max_new_tokens": 8},
            "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3}}
    proc = None
    if engine == "server":
        proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(two_eos), "--port", "0",
                                 "--adapter-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        found = re.search(r"http://127\.0\.0\.1:\d+/v1", proc.stdout.readline())
        assert found
        body["rollout"].update(base_url=found.group(0), adapter_dir=str(tmp_path / "adapters"))
    try:
        (tmp_path / "cfg.json").write_text(json.dumps(body))
        grpo.run(load_config(tmp_path / "cfg.json"), log=lambda _: None)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    step = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert (step["completion_len"], step["truncated_frac"]) == (3.0, 0.0)
    assert step["logprob_gap"] < 1e-5  # the stop token's log-prob came with it
