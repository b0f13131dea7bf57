"""The server under concurrent traffic, for real on 127.0.0.1: requests join a running batch,
dropped streams free their slot, a full queue answers 429, metrics parse as Prometheus text."""

import http.client
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from lorakit import LoraConfig, inject_lora, save_adapter
from lorakit.lora import load_adapter
from lorakit.models import load_model, load_tokenizer, write_demo_model
from lorakit.serve import LoraServer, ServerConfig, serve_in_thread

from .models import randomize_lora

openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")
prometheus_parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-batching")
    demo = write_demo_model(root / "demo")
    for i, name in enumerate(("math", "code")):
        model = load_model(str(demo))
        inject_lora(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
        randomize_lora(model, seed=30 + i, scale=0.2)
        save_adapter(model, root / name)
    return root


def _start(files, **limits):
    model = load_model(str(files / "demo")).eval()
    for name in ("math", "code"):
        load_adapter(model, files / name, adapter_name=name, activate=False)
    config = ServerConfig(base_name="demo", max_tokens_limit=1024, context_length=2048, **limits)
    server = LoraServer(model, load_tokenizer(str(files / "demo")), config)
    httpd, url = serve_in_thread(server)
    return server, httpd, url


@pytest.fixture(scope="module")
def served(files):
    server, httpd, url = _start(files)
    yield server, url
    httpd.shutdown()


def _get(url, path):
    with urllib.request.urlopen(url + path, timeout=60) as resp:
        return resp.read().decode()


def _open_stream(url, body):
    """A raw streaming request; returns the connection and response, headers read."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _wait_for(predicate, what):
    deadline = time.monotonic() + 120  # a bound against hanging, not a timing assertion
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_short_request_sent_during_a_long_one_finishes_first(served):
    server, url = served
    order = []
    conn, resp = _open_stream(url, {"model": "math", "prompt": "Tell me a long story", "max_tokens": 1000,
                                    "temperature": 0, "ignore_eos": True})
    assert resp.status == 200
    resp.readline()  # the long request is decoding

    def drain():
        for line in resp:
            if line.startswith(b"data: [DONE]"):
                order.append("long")
                return

    reader = threading.Thread(target=drain)
    reader.start()
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    short = client.completions.create(model="code", prompt="Hi", max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    order.append("short")
    reader.join(timeout=300)
    conn.close()
    assert order == ["short", "long"]
    assert short.usage.completion_tokens == 4
    assert server.engine.largest_batch >= 2  # they shared decode steps


def test_a_dropped_stream_frees_its_slot(served):
    server, url = served
    cancelled = server.metrics.cancelled._value.get()
    steps = server.engine.steps
    conn, resp = _open_stream(url, {"model": "demo", "prompt": "Go on and on", "max_tokens": 1000, "ignore_eos": True})
    resp.readline()
    assert server.engine.num_running == 1
    conn.sock.shutdown(2)  # the client goes away mid-stream
    conn.close()
    _wait_for(lambda: server.engine.num_running == 0 and server.metrics.cancelled._value.get() == cancelled + 1,
              "the dropped request kept its slot")
    assert server.engine.steps - steps < 1000  # it did not run to max_tokens
    health = json.loads(_get(url, "/health"))
    assert health["running"] == 0 and health["waiting"] == 0


def test_a_full_queue_answers_429_and_the_server_keeps_serving(files):
    server, httpd, url = _start(files, max_num_seqs=1, max_queue=1)
    try:
        body = {"model": "math", "prompt": "busy", "max_tokens": 1000, "ignore_eos": True}
        first = _open_stream(url, body)  # takes the only slot
        first[1].readline()
        waiting = threading.Thread(target=lambda: _open_stream(url, body))  # waits for the slot
        waiting.start()
        _wait_for(lambda: server.scheduler.waiting == 1, "the second request never queued")
        request = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "max_tokens": 2}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 429 and refused.value.headers["Retry-After"] == "1"
        error = json.loads(refused.value.read())["error"]
        assert error["type"] == "rate_limit_error" and "--max-queue 1" in error["message"]
        assert "lorakit_request_rejected_total 1.0" in _get(url, "/metrics")
        first[0].sock.shutdown(2)  # free the slot: the queued request runs, then a new one is served
        first[0].close()
        _wait_for(lambda: server.scheduler.waiting == 0, "the queued request never started")
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert client.completions.create(model="code", prompt="ok", max_tokens=3, temperature=0).usage.completion_tokens
    finally:
        httpd.shutdown()


def _merged_reference(files, adapter):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(files / "demo", dtype=torch.float32).eval()
    if adapter is None:
        return model
    return peft.PeftModel.from_pretrained(model, files / adapter).merge_and_unload().eval()


def test_mixed_adapter_concurrent_greedy_equals_transformers_with_the_adapter_merged(served, files):
    from transformers import AutoTokenizer

    _, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
    jobs = [("math", "The first story", 40), ("code", "def main():", 12), ("demo", "Hello", 20),
            ("math", "2+2=", 8), ("code", "Once", 25), ("demo", "A longer prompt about the weather today", 10)]
    results = [None] * len(jobs)

    def ask(i):
        model, prompt, n = jobs[i]
        results[i] = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].text

    threads = []
    for i in range(len(jobs)):  # staggered: later requests join a batch that is already decoding
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=300)
    tok = AutoTokenizer.from_pretrained(files / "demo")
    references = {name: _merged_reference(files, None if name == "demo" else name) for name in ("math", "code", "demo")}
    for (name, prompt, n), got in zip(jobs, results):
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = references[name].generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert got == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), (name, prompt)


def test_metrics_parse_as_prometheus_text(served):
    server, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    before = {f.name: f for f in prometheus_parser.text_string_to_metric_families(_get(url, "/metrics"))}
    tokens_before = before["lorakit_generation_tokens"].samples[0].value
    done = client.completions.create(model="math", prompt="count", max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    families = {f.name: f for f in prometheus_parser.text_string_to_metric_families(_get(url, "/metrics"))}
    assert {"lorakit_num_requests_running", "lorakit_num_requests_waiting", "lorakit_time_to_first_token_seconds",
            "lorakit_e2e_request_latency_seconds", "lorakit_generation_tokens"} <= set(families)
    assert families["lorakit_generation_tokens"].samples[0].value == tokens_before + done.usage.completion_tokens
    for name in ("lorakit_time_to_first_token_seconds", "lorakit_e2e_request_latency_seconds"):
        counts = [next(s.value for s in f[name].samples if s.name == name + "_count") for f in (before, families)]
        assert counts[1] == counts[0] + 1, name  # one more request observed
    assert families["lorakit_num_requests_running"].samples[0].value == 0
