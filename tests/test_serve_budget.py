"""The server's batch is bounded by a KV-cache token budget, and a prompt over the context is a 400.

Real HTTP on 127.0.0.1 against an in-process server; the oracle for the outputs is the engine
generating each request alone.
"""

import json
import threading
import urllib.error
import urllib.request

import pytest

from lorakit.cli import main
from lorakit.generation import Engine, Request, SamplingParams
from lorakit.models import load_model, load_tokenizer, write_demo_model
from lorakit.serve import LoraServer, ServerConfig, serve_in_thread


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("budget") / "demo")


def _post(url, body):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_budget_bounds_the_batch_and_an_over_context_prompt_is_a_400_naming_prompt(demo):
    model, tok = load_model(str(demo)).eval(), load_tokenizer(str(demo))
    prompt, new = list(range(40, 60)), 12  # 32 cache tokens per request
    config = ServerConfig(base_name="demo", context_length=48, max_num_batched_tokens=2 * 32 + 10, max_num_seqs=8)
    server = LoraServer(model, tok, config)
    httpd, url = serve_in_thread(server)
    try:
        status, body = _post(url, {"model": "demo", "prompt": list(range(40, 80)), "max_tokens": 9})
        assert status == 400 and body["error"]["param"] == "prompt", body
        assert body["error"]["code"] == "context_length_exceeded"
        assert "40 tokens" in body["error"]["message"] and "48" in body["error"]["message"]
        results = [None] * 5

        def one(i):
            results[i] = _post(url, {"model": "demo", "prompt": prompt, "max_tokens": new, "temperature": 0,
                                     "ignore_eos": True})
        threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        httpd.shutdown()
    assert all(r is not None and r[0] == 200 for r in results), results
    assert server.engine.largest_batch == 2  # 3 x 32 tokens would pass the budget of 74
    alone = Engine(model, tok).generate([Request(prompt, None, SamplingParams(new, ignore_eos=True))])[0]
    assert {r[1]["choices"][0]["text"] for r in results} == {alone.text}


def test_a_context_longer_than_the_budget_is_refused(demo, capsys):
    model, tok = load_model(str(demo)).eval(), load_tokenizer(str(demo))
    with pytest.raises(ValueError, match=r"context_length \(64\) exceeds max_num_batched_tokens \(32\)"):
        LoraServer(model, tok, ServerConfig(base_name="demo", context_length=64, max_num_batched_tokens=32))
    capsys.readouterr()
    assert main(["serve", "--model", str(demo), "--context-length", "2000", "--max-num-batched-tokens", "1024"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # refused before any weight is read
    assert err == ["lorakit serve: error: --context-length 2000 exceeds --max-num-batched-tokens 1024: a request as "
                   "long as the context could never be scheduled"], err
