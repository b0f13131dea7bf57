"""The Tinker API (``lorakit serve --tinker``) driven by the real tinker SDK over HTTP on 127.0.0.1.

Oracles are independent of the server: the demo model in plain transformers, the saved adapters
loaded with the real ``peft``, and ``torch.optim.AdamW`` stepping on that PEFT model.
"""

from __future__ import annotations

import json
import math
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

tinker = pytest.importorskip("tinker", reason="the tinker SDK (pip install 'lorakit[tinker]', Python >= 3.11)")
peft = pytest.importorskip("peft")
from tinker import types  # noqa: E402
from tinker.proto import tinker_public_pb2 as pb  # noqa: E402

from lorakit.models import load_model, load_tokenizer, write_demo_model  # noqa: E402
from lorakit.serve import LoraServer, ServerConfig, serve_in_thread  # noqa: E402
from lorakit.serve.tinker import TinkerConfig, TinkerService  # noqa: E402

BASE = "Qwen/Qwen3-8B-Base"
KEY = "tml-test-key"
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinker")
    demo = write_demo_model(root / "demo")
    model = load_model(str(demo)).eval()
    tokenizer = load_tokenizer(str(demo))
    server = LoraServer(model, tokenizer, ServerConfig(base_name=BASE, api_key=KEY, context_length=256,
                                                       max_tokens_limit=32))
    server.tinker = TinkerService(server, TinkerConfig(tinker_dir=root / "checkpoints", max_lora_rank=8))
    httpd, url = serve_in_thread(server)
    service = tinker.ServiceClient(base_url=url, api_key=KEY)
    yield {"url": url, "demo": demo, "root": root, "server": server, "service": service, "tokenizer": tokenizer}
    httpd.shutdown()


def _reference(setup, adapter_dir=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(setup["demo"]), dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    return model


def _path_of(setup, tinker_path: str):
    run, kind, name = tinker_path[len("tinker://"):].split("/")
    return setup["root"] / "checkpoints" / run / kind / name


def _datum(ids, weights=None):
    weights = [1.0] * (len(ids) - 1) if weights is None else weights
    return types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                       loss_fn_inputs={"target_tokens": ids[1:], "weights": weights})


def _logprobs(model, ids):
    """log p(ids[i + 1] | ids[:i + 1]) for i < len(ids) - 1, by a plain forward."""
    logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def _tensors(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def test_forward_backward_and_adamw_match_peft(setup):
    """Two accumulated forward_backward calls, then one clipped AdamW step: the adapter equals a PEFT
    model of the adapter stepped by torch's AdamW on the same summed loss."""
    tok = setup["tokenizer"]
    client = setup["service"].create_lora_training_client(base_model=BASE, rank=4, seed=3).result()
    a, b = tok(TEXT)["input_ids"], tok("Pack my box with five dozen liquor jugs")["input_ids"]
    wb = [0.0] * 5 + [1.5] * (len(b) - 6)
    before = _path_of(setup, client.save_weights_for_sampler("before").result().path)
    out = client.forward_backward([_datum(a)], "cross_entropy").result()
    client.forward_backward([_datum(b, wb)], "cross_entropy").result()
    adam = types.AdamParams(learning_rate=0.05, beta1=0.8, beta2=0.9, eps=1e-3, weight_decay=0.1, grad_clip_norm=0.5)
    client.optim_step(adam).result()
    after = _path_of(setup, client.save_weights_for_sampler("after").result().path)

    ref = _reference(setup, before)
    expected_a = _logprobs(ref, a)
    got_a = torch.tensor(out.loss_fn_outputs[0]["logprobs"].data)
    assert torch.allclose(got_a, expected_a, atol=1e-5)
    assert out.metrics["loss:sum"] == pytest.approx(float(-expected_a.detach().sum()), rel=1e-5)
    loss = -_logprobs(ref, a).sum() - (torch.tensor(wb) * _logprobs(ref, b)).sum()
    loss.backward()
    params = [p for p in ref.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    torch.optim.AdamW(params, lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1).step()
    # (PEFT also writes the tied embedding's base weight beside the head's LoRA: not an adapter tensor)
    stepped = {k: v for k, v in peft.get_peft_model_state_dict(ref).items() if "lora_" in k}
    saved = _tensors(after)
    assert set(saved) == set(stepped)
    changed = 0
    for key, value in saved.items():
        assert torch.allclose(value, stepped[key], atol=1e-5), (key, (value - stepped[key]).abs().max(), (value - stepped[key]).abs().argmax(), value.flatten()[(value - stepped[key]).abs().argmax()], stepped[key].flatten()[(value - stepped[key]).abs().argmax()])
        changed += not torch.equal(value, _tensors(before)[key])
    assert changed == len(saved)  # every A and B moved (B from zero)
    config = json.loads((after / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 32
    assert {"q_proj", "v_proj", "down_proj", "lm_head"} <= set(config["target_modules"])


def test_rl_losses_from_their_definition(setup):
    """importance_sampling and ppo (clip from loss_fn_config) return the summed loss their formula
    gives on the model's own log-probs; forward leaves no gradient behind."""
    tok = setup["tokenizer"]
    client = setup["service"].create_lora_training_client(base_model=BASE, rank=2, train_unembed=False).result()
    ids = tok(TEXT)["input_ids"]
    n = len(ids) - 1
    g = torch.Generator().manual_seed(0)
    old = (torch.randn(n, generator=g) * 0.5 - 4).tolist()
    adv = torch.randn(n, generator=g).tolist()
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "logprobs": old, "advantages": adv})
    lp = _logprobs(_reference(setup), ids).detach().double()  # a fresh adapter changes nothing: the base
    ratio = torch.exp(lp - torch.tensor(old).double())
    a = torch.tensor(adv).double()
    out = client.forward([datum], "importance_sampling").result()
    assert out.metrics["loss:sum"] == pytest.approx(float(-(ratio * a).sum()), rel=1e-4)
    out = client.forward([datum], "ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}).result()
    clipped = -torch.minimum(ratio * a, ratio.clamp(0.9, 1.05) * a).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(clipped), rel=1e-4)
    assert torch.allclose(torch.tensor(out.loss_fn_outputs[0]["logprobs"].data).double(), lp, atol=1e-5)
    # forward accumulated nothing: an optimizer step now leaves the adapter as it was
    client.optim_step(types.AdamParams(learning_rate=1.0)).result()
    saved = _tensors(_path_of(setup, client.save_weights_for_sampler("untouched").result().path))
    assert all(torch.count_nonzero(v) == 0 for k, v in saved.items() if "lora_B" in k)


def test_sampling_on_the_engine(setup):
    """Greedy samples equal a plain greedy decode; per-token and prompt log-probs equal the model's;
    seeds reproduce; a stop token id ends the sequence and is returned with its log-prob."""
    tok = setup["tokenizer"]
    sampler = setup["service"].create_sampling_client(base_model=BASE).result()
    prompt = tok("Once upon a time")["input_ids"]
    ref = _reference(setup)
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(ref(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = ids[len(prompt):]
    res = sampler.sample(types.ModelInput.from_ints(prompt), 2,
                         types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])).result()
    assert [s.tokens for s in res.sequences] == [greedy, greedy]
    assert all(s.stop_reason == "length" for s in res.sequences)
    expected = _logprobs(ref, ids)[len(prompt) - 1:]
    assert np.allclose(res.sequences[0].logprobs, expected.detach().numpy(), atol=1e-4)
    assert len({s.sequence_id for s in res.sequences}) == 2
    # a stop token: the sequence ends at its first occurrence, the stop token included
    stop = greedy[3]
    cut = greedy.index(stop) + 1
    res = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(max_tokens=8, temperature=0.0, stop=[stop])).result()
    assert res.sequences[0].tokens == greedy[:cut] and res.sequences[0].stop_reason == "stop"
    assert len(res.sequences[0].logprobs) == cut
    # seeded sampling is reproducible, whatever else is in the batch
    params = types.SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = sampler.sample(types.ModelInput.from_ints(prompt), 3, params).result()
    again = sampler.sample(types.ModelInput.from_ints(prompt), 3, params).result()
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1  # each sample its own seed
    # prompt log-probs (compute_logprobs): None first, then the model's
    got = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result()
    assert got[0] is None
    assert np.allclose(got[1:], _logprobs(ref, prompt).detach().numpy(), atol=1e-4)


def test_two_clients_in_one_mixed_step_train_as_alone(setup):
    """Two clients' forward_backward requests that arrive together run as one mixed-adapter step, and
    after three steps each adapter is what the same client trained alone gives (within 1e-5)."""
    tok = setup["tokenizer"]
    service, trainer = setup["service"], setup["server"].tinker.trainer
    data = {0: [_datum(tok(TEXT)["input_ids"])],
            1: [_datum(tok("Sphinx of black quartz, judge my vow")["input_ids"]), _datum(tok("abc")["input_ids"])]}

    def train(client, k, steps):
        futures = []
        for _ in range(steps):
            futures.append(client.forward_backward(data[k], "cross_entropy"))
            futures.append(client.optim_step(types.AdamParams(learning_rate=1e-3, eps=1e-8)))
        return futures

    alone = []
    for k in (0, 1):
        client = service.create_lora_training_client(base_model=BASE, rank=4, seed=10 + k).result()
        [f.result() for f in train(client, k, 3)]
        alone.append(_tensors(_path_of(setup, client.save_weights_for_sampler(f"alone{k}").result().path)))
    clients = [service.create_lora_training_client(base_model=BASE, rank=4, seed=10 + k).result() for k in (0, 1)]
    steps_before = trainer.steps
    with trainer.hold():  # both clients' requests are queued before any runs
        futures = [train(client, k, 3) for k, client in enumerate(clients)]
        expected = sum(len(f) for f in futures)
        queued = lambda: sum(len(trainer.models[c.model_id].queue) for c in clients)  # noqa: E731
        for _ in range(200):
            if queued() == expected:
                break
            threading.Event().wait(0.05)
        assert queued() == expected
    [f.result() for fs in futures for f in fs]
    assert trainer.largest_step >= 2
    assert trainer.steps - steps_before == 3  # three mixed steps, not six
    for k, client in enumerate(clients):
        together = _tensors(_path_of(setup, client.save_weights_for_sampler(f"together{k}").result().path))
        worst = max(float((together[key] - value).abs().max()) for key, value in alone[k].items())
        assert worst < 1e-5, worst


def _post(url, path, body, key=KEY, proto=None):
    headers = {"Content-Type": "application/x-protobuf" if proto is not None else "application/json"}
    if key is not None:
        headers["X-API-Key"] = key
    data = proto if proto is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + "/api/v1/" + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
            return response.status, (json.loads(raw) if "json" in response.headers.get("content-type", "") else raw)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _result(url, request_id):
    for _ in range(20):
        status, body = _post(url, "retrieve_future", {"request_id": request_id})
        if not (isinstance(body, dict) and body.get("type") == "try_again"):
            return status, body
    raise AssertionError("no result")


def test_raw_submit_retried_with_the_same_seq_id_runs_once(setup):
    """A forward_backward submitted twice with the same (model_id, seq_id) gets one request id and
    runs once: after an optimizer step the adapter equals one trained on a single submit (whose
    optimizer step arrived before it, and waited for it: requests run in seq_id order)."""
    url, tok = setup["url"], setup["tokenizer"]
    ids = tok(TEXT)["input_ids"]
    _, session = _post(url, "create_session", {"tags": [], "user_metadata": {}, "sdk_version": "raw"})
    adapters, norms = [], []
    for model_seq, submits in ((0, 2), (1, 1)):
        _, created = _post(url, "create_model", {"session_id": session["session_id"], "model_seq_id": model_seq,
                                                 "base_model": BASE, "lora_config": {"rank": 4, "seed": 5}})
        _, model = _result(url, created["request_id"])
        model_id = model["model_id"]
        msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=1, loss_fn="cross_entropy")
        datum = msg.data.add()
        datum.model_input.add().encoded_text.tokens = np.asarray(ids[:-1], dtype=np.int32).tobytes()
        for key, values, dtype, np_dtype in (("target_tokens", ids[1:], pb.DTYPE_INT64, np.int64),
                                             ("weights", [1.0] * (len(ids) - 1), pb.DTYPE_FLOAT32, np.float32)):
            datum.loss_fn_inputs[key].CopyFrom(pb.Tensor(dense=np.asarray(values, dtype=np_dtype).tobytes(),
                                                         dtype=dtype, shape=[len(values)]))
        step_body = {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 0.1}}
        if submits == 1:  # the optimizer step arrives first: it waits for seq_id 1
            _, step = _post(url, "optim_step", step_body)
        request_ids = {_post(url, "forward_backward", None, proto=msg.SerializeToString())[1]["request_id"]
                       for _ in range(submits)}
        assert len(request_ids) == 1
        status, raw = _result(url, request_ids.pop())
        out = pb.ForwardBackwardOutput()
        out.ParseFromString(raw)
        assert out.metrics["loss:sum"] > 0
        if submits != 1:
            _, step = _post(url, "optim_step", step_body)
        norms.append(_result(url, step["request_id"])[1]["metrics"]["optim/grad_norm:mean"])
        _, saved = _post(url, "save_weights_for_sampler", {"model_id": model_id, "seq_id": 3, "path": "once"})
        adapters.append(_tensors(_path_of(setup, _result(url, saved["request_id"])[1]["path"])))
    assert norms[0] > 0 and norms[0] == norms[1]  # a second run would have doubled the gradient
    for key, value in adapters[0].items():
        assert torch.equal(value, adapters[1][key]), key


def test_bad_input_is_one_clear_error_and_disturbs_nothing(setup):
    tok = setup["tokenizer"]
    service, url = setup["service"], setup["url"]
    with pytest.raises(tinker.RequestFailedError, match="unknown base model 'nope/model'"):
        service.create_lora_training_client(base_model="nope/model", rank=4).result()
    with pytest.raises(tinker.RequestFailedError, match="rank 16 exceeds this server's --max-lora-rank 8"):
        service.create_lora_training_client(base_model=BASE, rank=16).result()
    client = service.create_lora_training_client(base_model=BASE, rank=4).result()
    ids = tok(TEXT)["input_ids"]
    good = client.forward([_datum(ids)], "cross_entropy").result().metrics["loss:sum"]
    with pytest.raises(tinker.RequestFailedError, match=r"data\[0\]: model_input holds token id 99999, outside"):
        client.forward_backward([_datum([1, 99999, 3])], "cross_entropy").result()
    short = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:-2], "weights": [1.0] * (len(ids) - 3)})
    with pytest.raises(tinker.RequestFailedError, match=r"loss_fn_inputs\['target_tokens'\] has shape \[\d+\]; it must be"):
        client.forward_backward([short], "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match="unknown loss_fn 'dpo'"):
        client.forward_backward([_datum(ids)], "dpo").result()
    run = client.model_id
    with pytest.raises(tinker.RequestFailedError, match="unknown checkpoint"):
        client.load_state(f"tinker://{run}/weights/never-saved").result()
    with pytest.raises(tinker.RequestFailedError, match="invalid path 'tinker://a/b/c/d'"):
        client.load_state("tinker://a/b/c/d").result()
    with pytest.raises(tinker.RequestFailedError, match="outside this server's --tinker-dir"):
        client.load_state("tinker://../weights/x").result()
    with pytest.raises(Exception, match="unknown checkpoint|outside"):
        service.create_sampling_client(model_path=f"tinker://{run}/sampler_weights/none").result()
    # the key: missing or wrong is refused (401) with the reason
    status, body = _post(url, "create_session", {"tags": []}, key=None)
    assert status == 401 and "API key" in body["error"]
    status, body = _post(url, "create_session", {"tags": []}, key="tml-wrong")
    assert status == 401
    with pytest.raises(Exception, match="invalid or missing API key"):
        tinker.ServiceClient(base_url=url, api_key="tml-wrong").create_lora_training_client(base_model=BASE)
    # nothing was disturbed: the same client trains on, and computes the same loss as before
    assert client.forward([_datum(ids)], "cross_entropy").result().metrics["loss:sum"] == pytest.approx(good)
    client.forward_backward([_datum(ids)], "cross_entropy").result()
    client.optim_step(types.AdamParams(learning_rate=0.01)).result()


def test_state_round_trip_and_openai_serving(setup):
    """save_state then create_training_client_from_state_with_optimizer continues exactly (the same
    next step as the original); an adapter trained here is served by name on /v1/chat/completions."""
    tok = setup["tokenizer"]
    service = setup["service"]
    client = service.create_lora_training_client(base_model=BASE, rank=4, seed=1).result()
    batch = [_datum(tok(TEXT)["input_ids"])]
    adam = types.AdamParams(learning_rate=0.02)
    for _ in range(2):
        client.forward_backward(batch, "cross_entropy")
        client.optim_step(adam).result()
    state = client.save_state("mid").result().path
    resumed = service.create_training_client_from_state_with_optimizer(state).result()
    weights_only = service.create_training_client_from_state(state).result()
    for c in (client, resumed, weights_only):
        c.forward_backward(batch, "cross_entropy")
        c.optim_step(adam).result()
    saved = [_tensors(_path_of(setup, c.save_weights_for_sampler("next").result().path))
             for c in (client, resumed, weights_only)]
    assert all(torch.allclose(saved[0][k], saved[1][k], atol=1e-6) for k in saved[0])
    assert any(not torch.allclose(saved[0][k], saved[2][k], atol=1e-6) for k in saved[0])  # fresh moments differ
    request = urllib.request.Request(
        setup["url"] + "/v1/chat/completions", method="POST",
        data=json.dumps({"model": client.model_id, "max_tokens": 4,
                         "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    assert body["model"] == client.model_id and body["usage"]["completion_tokens"] >= 1
    assert math.isfinite(body["usage"]["total_tokens"])


def test_sessions_polls_and_snapshot_lifetimes(setup):
    """Capabilities name the base; a pending future answers try_again within the poll timeout; a
    training client keeps its two newest sampler snapshots (older ones are freed, with a clear error);
    finishing a session frees its adapters, and its heartbeat then answers 410."""
    url, server, tok = setup["url"], setup["server"], setup["tokenizer"]
    caps = tinker.RestClient(base_url=url, api_key=KEY).get_server_capabilities().result()
    assert [m.model_name for m in caps.supported_models] == [BASE]
    service = tinker.ServiceClient(base_url=url, api_key=KEY)
    client = service.create_lora_training_client(base_model=BASE, rank=2).result()
    trainer, service_state = server.tinker.trainer, server.tinker
    old_timeout = service_state.config.poll_timeout
    service_state.config.poll_timeout = 0.3
    try:
        with trainer.hold():
            future = client.forward([_datum(tok(TEXT)["input_ids"])], "cross_entropy")
            for _ in range(100):
                if trainer.models[client.model_id].queue:
                    break
                threading.Event().wait(0.05)
            op = next(iter(trainer.models[client.model_id].queue.values()))
            status, body = _post(url, "retrieve_future", {"request_id": op.record.request_id})
            assert status == 200 and body["type"] == "try_again"
        assert future.result().metrics["loss:sum"] > 0
    finally:
        service_state.config.poll_timeout = old_timeout
    samplers = [client.save_weights_and_get_sampling_client().result() for _ in range(3)]
    prompt = types.ModelInput.from_ints(tok("hi")["input_ids"])
    params = types.SamplingParams(max_tokens=2)
    assert all(len(s.sample(prompt, 1, params).result().sequences) == 1 for s in samplers[1:])
    with pytest.raises(Exception, match="unknown sampling session"):
        samplers[0].sample(prompt, 1, params).result()
    adapters = server.engine.adapters()
    assert client.model_id in adapters and sum(a.startswith(client.model_id + "-sampler-") for a in adapters) == 2
    session_id = service.holder.get_session_id()
    status, _ = _post(url, f"sessions/{session_id}/finish", {"reason": {"type": "success"}})
    assert status == 200
    assert not any(a.startswith(client.model_id) for a in server.engine.adapters())
    status, body = _post(url, "session_heartbeat", {"session_id": session_id})
    assert status == 410 and "finished" in body["error"]
