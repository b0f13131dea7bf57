"""One bad request, or a dead worker, must not hurt the others: a real server on 127.0.0.1.

Out-of-vocabulary token ids and out-of-range seeds are refused with a 400 naming the field while
other requests decode on; an error raised for one request on the worker thread ends that request
only; a worker thread that dies for real (the model raises a BaseException) turns /health into
503 and every pending request into an error instead of a hang; a stream whose client leaves
before its first token is taken out of the queue and is never prefilled. A request whose rows
fail an engine step (a real bad input past the HTTP checks: a GPT-2 row running past the model's
position table) fails alone, with a 400 or a 500 naming it, while the requests batched with it
finish exactly as they do alone; an unrecoverable (CUDA) error turns /health into 503.
"""

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from torch import nn

from lorakit.generation import Completion, Request, SamplingParams
from lorakit.models import load_model, load_tokenizer, write_demo_model
from lorakit.serve import LoraServer, ServerConfig, serve_in_thread

from .models import Poisoned

pytest.importorskip("uvicorn")
HTTP_TIMEOUT = 60  # a bound against hanging (what the dead-worker bug did), not a timing assertion


class Fatal(BaseException):
    """What a dying worker sees: not an ``Exception`` (a KeyboardInterrupt, a SystemExit, an abort)."""


class Tripwire(nn.Module):
    """Wraps one block's MLP; once ``armed`` is set, its forward raises ``Fatal`` (the model's own code
    fails, in the worker thread, exactly where a broken kernel would)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.armed = threading.Event()

    def forward(self, x):
        if self.armed.is_set():
            raise Fatal("the model's forward raised a BaseException")
        return self.inner(x)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("serve-robust") / "demo")


def _start(demo, tripwire=False, model=None, **limits):
    model = load_model(str(demo)).eval() if model is None else model
    wire = None
    if tripwire:
        wire = model.model.layers[0].mlp = Tripwire(model.model.layers[0].mlp)
    config = ServerConfig(base_name="demo", max_tokens_limit=1024, context_length=2048, **limits)
    server = LoraServer(model, load_tokenizer(str(demo)), config)
    httpd, url = serve_in_thread(server)
    return server, httpd, url, wire


@pytest.fixture(scope="module")
def served(demo):
    server, httpd, url, _ = _start(demo)
    yield server, url
    httpd.shutdown()


def _post(url, body, path="/v1/completions"):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(url, path):
    try:
        with urllib.request.urlopen(url + path, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _open_stream(url, body):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HTTP_TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def _events(resp):
    """The data lines of a server-sent event stream up to [DONE] (or the end of the stream)."""
    out = []
    for line in resp:
        if line.startswith(b"data: "):
            if line.startswith(b"data: [DONE]"):
                return out, True
            out.append(json.loads(line[6:]))
    return out, False


def _wait_for(predicate, what):
    deadline = time.monotonic() + 120  # a bound against hanging, not a timing assertion
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _ttft_count(server):
    return next(s.value for s in server.metrics.ttft.collect()[0].samples if s.name.endswith("_count"))


LONG = {"model": "demo", "prompt": "Tell me a long story", "max_tokens": 120, "temperature": 0, "ignore_eos": True}


@pytest.mark.parametrize("prompt", [[5, 6, 10**6], [5, -1, 6], [5, True, 6]])
def test_an_out_of_vocabulary_prompt_is_a_400_and_the_batch_decodes_on(served, prompt):
    server, url = served
    conn, resp = _open_stream(url, LONG)
    assert resp.status == 200
    resp.readline()  # the long request is decoding
    status, body = _post(url, {"model": "demo", "prompt": prompt, "max_tokens": 4})
    assert status == 400, body
    assert body["error"]["param"] == "prompt" and "vocabulary" in body["error"]["message"], body
    chunks, finished = _events(resp)
    conn.close()
    assert finished and not any("error" in c for c in chunks), chunks[-1:]
    # every one of the 120 tokens arrived: the bad request took nothing from the in-flight one
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] == "length") == 1
    status, body = _post(url, {"model": "demo", "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**70, "7", 1.5, True])
def test_a_seed_outside_int64_or_not_an_integer_is_a_400(served, seed):
    _, url = served
    status, body = _post(url, {"model": "demo", "prompt": "Hi", "max_tokens": 2, "temperature": 1.0, "seed": seed})
    assert status == 400, body
    assert body["error"]["param"] == "seed", body


def test_seeds_at_the_int64_bounds_are_served_and_reproducible(served):
    _, url = served
    for seed in (2**63 - 1, -(2**63), 0):
        body = {"model": "demo", "prompt": "Hi", "max_tokens": 6, "temperature": 1.0, "seed": seed, "ignore_eos": True}
        first, again = _post(url, body), _post(url, body)
        assert first[0] == again[0] == 200, (first, again)
        assert first[1]["choices"][0]["text"] == again[1]["choices"][0]["text"]


def _submit(server, request, items):
    done = threading.Event()

    def sink(item):
        items.append(item)
        if isinstance(item, (Completion, BaseException)):
            done.set()

    server.scheduler.submit(request, sink)
    return done


@pytest.mark.parametrize("bad", ["stop", "sink"])
def test_an_error_of_one_request_on_the_worker_ends_that_request_only(served, bad):
    """Requests handed to the scheduler directly (as an embedding program does, past the HTTP
    checks): the worker thread meets the error, ends that request, and serves the next."""
    server, url = served
    tokenizer = server.tokenizer
    ids = tokenizer("Hello there")["input_ids"]
    conn, resp = _open_stream(url, LONG)  # in flight all along
    resp.readline()
    items = []
    if bad == "stop":  # the engine's add_request raises a TypeError (not a ValueError) for this request
        done = _submit(server, Request(ids, None, SamplingParams(max_new_tokens=3, stop=5)), items)
        assert done.wait(HTTP_TIMEOUT), "the bad request never ended"
        assert isinstance(items[-1], Exception)
    else:  # the request's sink raises (its client's event loop is gone) when its tokens are delivered
        def broken(item):
            items.append(item)
            raise RuntimeError("Event loop is closed")

        server.scheduler.submit(Request(ids, None, SamplingParams(max_new_tokens=50, ignore_eos=True)), broken)
        _wait_for(lambda: items, "the request never produced a token")
    chunks, finished = _events(resp)
    conn.close()
    assert finished and not any("error" in c for c in chunks), chunks[-1:]
    good = []
    done = _submit(server, Request(ids, None, SamplingParams(max_new_tokens=3, ignore_eos=True)), good)
    assert done.wait(HTTP_TIMEOUT), "the worker stopped serving after one request's error"
    assert isinstance(good[-1], Completion) and len(good[-1].token_ids) == 3
    _wait_for(lambda: server.engine.num_running == 0, "the broken request kept its slot")
    assert _get(url, "/health")[0] == 200


def test_a_dead_worker_turns_health_into_503_and_pending_requests_into_errors(demo):
    server, httpd, url, wire = _start(demo, tripwire=True, max_num_seqs=1)
    try:
        assert _get(url, "/health")[0] == 200
        conn, resp = _open_stream(url, {**LONG, "max_tokens": 1000})  # holds the only slot
        resp.readline()
        pending = {}
        waiter = threading.Thread(target=lambda: pending.update(answer=_post(url, {**LONG, "stream": False})))
        waiter.start()
        _wait_for(lambda: server.scheduler.waiting == 1, "the second request never queued")
        wire.armed.set()  # the next forward raises a BaseException on the worker thread
        chunks, _ = _events(resp)
        conn.close()
        assert chunks and "error" in chunks[-1], "the in-flight stream did not hear that the worker died"
        waiter.join(HTTP_TIMEOUT)
        assert not waiter.is_alive(), "the queued request hangs"
        status, body = pending["answer"]
        assert status == 500 and body["error"]["type"] == "server_error", body
        _wait_for(lambda: not server.scheduler._thread.is_alive(), "the worker thread lives on")  # it really died
        status, body = _get(url, "/health")
        assert status == 503 and "Fatal" in json.dumps(body), body
        status, body = _post(url, {"model": "demo", "prompt": "Hi", "max_tokens": 2})
        assert status == 503, body
        status, body = _post(url, {"lora_name": "x", "lora_path": "nowhere"}, path="/v1/load_lora_adapter")
        assert status == 503, body
    finally:
        httpd.shutdown()


def test_a_stream_dropped_before_its_first_token_never_reaches_the_engine(demo):
    server, httpd, url, _ = _start(demo, max_num_seqs=1)
    try:
        conn, resp = _open_stream(url, {**LONG, "max_tokens": 1000})  # holds the only slot
        resp.readline()
        resp.readline()
        ttft, cancelled = _ttft_count(server), server.metrics.cancelled._value.get()
        host, port = url.removeprefix("http://").split(":")
        waiting = socket.create_connection((host, int(port)), timeout=HTTP_TIMEOUT)
        body = json.dumps({**LONG, "prompt": "queued", "stream": True}).encode()
        waiting.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        _wait_for(lambda: server.scheduler.waiting == 1, "the second stream never queued")
        waiting.shutdown(socket.SHUT_RDWR)  # its client goes away before its first token
        waiting.close()
        _wait_for(lambda: server.metrics.cancelled._value.get() == cancelled + 1, "the dropped stream stayed queued")
        # the worker takes it out of the engine's queue at its next step boundary
        _wait_for(lambda: server.scheduler.waiting == 0, "the dropped stream stayed in the engine's queue")
        assert server.engine.num_running == 1  # the first stream still decodes: the queued one left on its own
        assert _ttft_count(server) == ttft  # it was never prefilled: no first token was ever produced for it
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        _wait_for(lambda: server.engine.num_running == 0 and not server.engine.has_unfinished(), "a slot stayed taken")
        assert _ttft_count(server) == ttft
    finally:
        httpd.shutdown()


def _together(server, url, bodies):
    """POST ``bodies`` so that they join the engine's batch in the same step: the worker is held
    between two steps (``exclusive``) until all of them are queued. Returns their (status, body)."""
    held, release = threading.Event(), threading.Event()

    def hold():
        held.set()
        release.wait(HTTP_TIMEOUT)

    holder = threading.Thread(target=server.scheduler.exclusive, args=(hold,))
    holder.start()
    assert held.wait(HTTP_TIMEOUT)
    answers = [None] * len(bodies)

    def post(i):
        answers[i] = _post(url, bodies[i])

    posts = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in posts:
        t.start()
    _wait_for(lambda: server.scheduler.waiting == len(bodies), "the requests never queued")
    release.set()
    for t in posts + [holder]:
        t.join(HTTP_TIMEOUT)
    return answers


def test_a_request_running_past_gpt2_positions_is_a_400_and_its_batch_finishes_as_if_alone(demo):
    """The server's context (2048) is longer than this GPT-2's position table (32): the HTTP checks
    pass the long request, and its decode step at position 32 raises inside the batched forward."""
    import transformers as T

    torch.manual_seed(0)
    vocab = len(load_tokenizer(str(demo)))
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=vocab, n_positions=32,
                                           bos_token_id=0, eos_token_id=0)).eval()
    server, httpd, url, _ = _start(demo, model=model)
    try:
        good = [{"model": "demo", "prompt": [5 + i, 6, 7, 8], "max_tokens": 26, "temperature": 0, "ignore_eos": True}
                for i in range(2)]
        bad = {"model": "demo", "prompt": list(range(10, 30)), "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        answers = _together(server, url, [good[0], bad, good[1]])
        status, body = answers[1]
        assert status == 400 and body["error"]["param"] == "prompt", body
        assert "position 32" in body["error"]["message"] and "n_positions" in body["error"]["message"], body
        for request, (status, body) in zip(good, answers[::2]):
            assert status == 200, body
            assert body["usage"]["completion_tokens"] == 26  # it outlived the failure (at its 13th step)
            alone = _post(url, request)
            assert alone[0] == 200 and alone[1]["choices"][0]["text"] == body["choices"][0]["text"]
        assert server.engine.largest_batch == 3
        assert _get(url, "/health")[0] == 200
    finally:
        httpd.shutdown()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker dies on purpose
def test_a_row_failing_for_no_known_reason_is_a_500_naming_it_and_a_cuda_error_is_a_503(demo):
    model = load_model(str(demo)).eval()
    poisoned = model.model.embed_tokens = Poisoned(model.model.embed_tokens, poison=42)
    server, httpd, url, _ = _start(demo, model=model)
    try:
        good = {"model": "demo", "prompt": [5, 6, 7], "max_tokens": 20, "temperature": 0, "ignore_eos": True}
        (status, body), (bad_status, bad) = _together(
            server, url, [good, {"model": "demo", "prompt": [8, 42, 9], "max_tokens": 20, "ignore_eos": True}])
        assert bad_status == 500 and bad["error"]["type"] == "server_error", bad
        assert "also when run alone" in bad["error"]["message"] and "kernel failed" in bad["error"]["message"], bad
        assert status == 200 and body["usage"]["completion_tokens"] == 20, body
        assert body["choices"][0]["text"] == _post(url, good)[1]["choices"][0]["text"]
        assert _get(url, "/health")[0] == 200

        conn, resp = _open_stream(url, LONG)
        resp.readline()
        poisoned.error, poisoned.armed = torch.AcceleratorError, True  # a CUDA error poisons the whole device
        chunks, _ = _events(resp)
        conn.close()
        assert chunks and "error" in chunks[-1], "the in-flight stream did not hear that the engine broke"
        assert "AcceleratorError" in json.dumps(chunks[-1]), chunks[-1]
        status, body = _get(url, "/health")
        assert status == 503 and "EngineBroken" in json.dumps(body), body
        assert _post(url, good)[0] == 503
    finally:
        httpd.shutdown()
