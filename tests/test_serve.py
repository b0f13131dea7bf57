"""`lorakit serve` for real: a subprocess on 127.0.0.1, driven by the `openai` client and plain HTTP."""

import json
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch

from lorakit import LoraConfig, inject_lora, save_adapter
from lorakit.models import load_model, write_demo_model

from .models import randomize_lora, tiny_qwen3

openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")
KEY = "test-key"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    demo = write_demo_model(root / "demo")
    adapters = root / "adapters"
    for i, name in enumerate(("math", "code", "spare")):
        model = load_model(str(demo))
        inject_lora(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
        randomize_lora(model, seed=i, scale=0.2)
        save_adapter(model, adapters / name)
    # an adapter for another base: must be refused on load
    other = tiny_qwen3()
    inject_lora(other, LoraConfig(r=8, target_modules=["q_proj"]))
    save_adapter(other, adapters / "wrong_base")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "serve", "--model", str(demo), "--port", "0", "--api-key", KEY,
         "--adapter", f"math={adapters / 'math'}", "--adapter", f"code={adapters / 'code'}",
         "--adapter-dir", str(adapters), "--max-tokens-limit", "64", "--max-body-bytes", "20000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    assert found, line + proc.stdout.read() if proc.poll() is not None else line
    url = f"http://127.0.0.1:{found.group(1)}"
    yield {"url": url, "demo": demo, "adapters": adapters, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(setup):
    return openai.OpenAI(base_url=setup["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _reference(setup, adapter):
    """The oracle: the base in plain transformers, with the adapter loaded by the real ``peft``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["demo"], dtype=torch.float32).eval()
    if adapter:
        model = peft.PeftModel.from_pretrained(model, setup["adapters"] / adapter).eval()
    return model


def _expected(setup, adapter, prompt, n, chat, ignore_eos=False):
    """Greedy text from transformers' own ``generate`` (no lorakit code on this path)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup["demo"])
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if chat else prompt
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = _reference(setup, adapter).generate(**ids, max_new_tokens=n, do_sample=False,
                                                  min_new_tokens=n if ignore_eos else 0)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _post(setup, path, body, key=KEY, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(setup["url"] + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "demo" and {"math", "code"} <= set(ids)


def test_completions_pick_the_adapter_by_model_name(setup, client):
    texts = {}
    for name in ("math", "code", "demo"):
        got = client.completions.create(model=name, prompt="Hello", max_tokens=10, temperature=0)
        texts[name] = got.choices[0].text
        assert texts[name] == _expected(setup, None if name == "demo" else name, "Hello", 10, chat=False)
        assert got.usage.completion_tokens <= 10 and got.model == name
    assert len(set(texts.values())) == 3  # a wrong adapter would show


def test_chat_completion_and_its_stream_agree(setup, client):
    messages = [{"role": "user", "content": "Who are you?"}]
    whole = client.chat.completions.create(model="math", messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == _expected(setup, "math", messages, 12, chat=True)
    stream = client.chat.completions.create(model="math", messages=messages, max_tokens=12, temperature=0, stream=True)
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason


def test_concurrent_requests_to_different_adapters_are_batched(setup, client):
    names = ["math", "code", "demo", "math", "code", "demo"]
    results = [None] * len(names)

    def ask(i):
        results[i] = client.completions.create(model=names[i], prompt=f"Item {i}:", max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, name in enumerate(names):
        alone = _expected(setup, None if name == "demo" else name, f"Item {i}:", 8, chat=False, ignore_eos=True)
        assert results[i] == alone, (i, name)
    with urllib.request.urlopen(urllib.request.Request(setup["url"] + "/health",
                                                       headers={"Authorization": f"Bearer {KEY}"})) as resp:
        assert json.loads(resp.read())["largest_batch"] > 1


def test_load_and_unload_cycle(setup, client):
    status, body = _post(setup, "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "spare"})
    assert status == 200, body
    assert "fresh" in [m.id for m in client.models.list().data]
    got = client.completions.create(model="fresh", prompt="Hello", max_tokens=6, temperature=0).choices[0].text
    assert got == _expected(setup, "spare", "Hello", 6, chat=False)
    status, _ = _post(setup, "/v1/unload_lora_adapter", {"lora_name": "fresh"})
    assert status == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="fresh", prompt="Hello", max_tokens=2)


@pytest.mark.parametrize(
    "path, body, raw, key, status, fragment",
    [
        ("/v1/completions", None, b"{not json", KEY, 400, "invalid JSON"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, None, KEY, 404, "does not exist"),
        ("/v1/completions", {"model": "math", "prompt": "x" * 2100, "max_tokens": 8}, None, KEY, 400, "exceeds the model's context"),
        ("/v1/completions", {"model": "math", "prompt": "x", "max_tokens": 1000}, None, KEY, 400, "exceeds this server's limit"),
        ("/v1/completions", {"model": "math", "prompt": "x"}, None, "wrong", 401, "API key"),
        ("/v1/completions", {"model": "math", "prompt": "x" * 30000}, None, KEY, 413, "exceeds the limit"),
        ("/v1/load_lora_adapter", {"lora_name": "esc", "lora_path": "../../etc"}, None, KEY, 403, "outside"),
        ("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "wrong_base"}, None, KEY, 400, "does not fit the model"),
        ("/v1/chat/completions", {"model": "math", "messages": "hi"}, None, KEY, 400, "'messages'"),
    ],
)
def test_bad_requests_get_openai_style_errors_and_the_server_lives_on(setup, client, path, body, raw, key, status, fragment):
    code, payload = _post(setup, path, body, key=key, raw=raw)
    assert code == status
    assert fragment in payload["error"]["message"] and "type" in payload["error"]
    assert "bad" not in [m.id for m in client.models.list().data]
    assert client.completions.create(model="math", prompt="ok", max_tokens=2).choices[0].text is not None


def test_merge_export_loads_in_transformers_and_matches(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "lorakit", "merge", "--model", str(setup["demo"]), "--adapter",
                           str(setup["adapters"] / "math"), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = _reference(setup, "math")
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
    assert list(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()
    half = subprocess.run([sys.executable, "-m", "lorakit", "merge", "--model", str(setup["demo"]), "--adapter",
                           str(setup["adapters"] / "math"), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"],
                          capture_output=True, text=True, timeout=300)
    assert half.returncode == 0, half.stderr
    assert re.search(r"changed weights by at most [0-9.e-]+ \(max abs\)", half.stdout)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
