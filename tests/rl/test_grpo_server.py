"""GRPO's server rollout backend against a real `lorakit serve` on 127.0.0.1: only adapters travel; async
rollouts; a stale server is caught (the version check and the trainer-vs-sampler log-prob gap)."""

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

import lorakit.recipes.grpo as grpo
from lorakit.config import load_config
from lorakit.generation import Engine, Request, SamplingParams
from lorakit.lora import LoraConfig, adapter_configs, adapter_state_dict, inject_lora, save_adapter
from lorakit.models import load_model, load_tokenizer, write_demo_model
from lorakit.rl import PolicySampler, RolloutServerError, ServerRollout, StaleRolloutError, adapter_fingerprint

from ..models import randomize_lora
from .grpo_runs import grpo_config, reward_steps

peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]
KEY = "rollout-key"
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    demo = write_demo_model(root / "demo")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(demo), "--port", "0",
                             "--api-key", KEY, "--adapter-dir", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    assert found, line + (proc.stdout.read() if proc.poll() is not None else "")
    yield {"url": f"http://127.0.0.1:{found.group(1)}/v1", "demo": demo, "root": root}
    proc.terminate()
    proc.wait(timeout=30)


def _models(server):
    req = urllib.request.Request(server["url"] + "/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["data"]


def _served(server):
    return [m["id"] for m in _models(server)]


def _peft_policy(server, state):
    """The oracle: the base in plain transformers with the policy's LoRA tensors put in by ``peft``."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(server["demo"], dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    result = peft.set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys
    return model.eval()


def test_each_sync_loads_the_new_adapter_and_completions_follow_it(server):
    tokenizer = load_tokenizer(server["demo"])
    policy = load_model(server["demo"], dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(policy, LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    eos = [tokenizer.eos_token_id]
    rollout = ServerRollout(server["url"], server["root"] / "sync", eos, api_key=KEY)
    prompt = tokenizer("12+7=")["input_ids"]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=11)
    seen = []
    for version, seed in enumerate((1, 2)):
        randomize_lora(policy, seed=seed, scale=0.3)  # an "update"
        name = rollout.load(f"policy-v{version}", adapter_configs(policy)["default"], adapter_state_dict(policy))
        assert _served(server)[1:] == [name]  # the previous version was unloaded
        # the server's hash of the weights it read is the trainer's of the weights it has
        assert _models(server)[1]["fingerprint"] == adapter_fingerprint(adapter_state_dict(policy))
        reference = _peft_policy(server, adapter_state_dict(policy))
        with torch.no_grad():
            want = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                      max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
        for params in (greedy, sampled):
            remote = rollout.generate([prompt], [params], model=name)[0]
            if params is greedy:  # transformers' greedy decoding, stop token included
                assert remote.token_ids == want
                assert remote.text == tokenizer.decode(want, skip_special_tokens=True)
                assert remote.finish_reason == ("stop" if want[-1] in eos else "length")
            # the reported log-probs are the policy's: a full forward of prompt + completion
            with torch.no_grad():
                logits = reference(torch.tensor([prompt + remote.token_ids])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            expected = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(remote.token_ids)]
            assert len(remote.logprobs) == len(remote.token_ids)
            assert max(abs(a - b) for a, b in zip(remote.logprobs, expected)) < 1e-5
        seen.append(remote.token_ids)
    assert seen[0] != seen[1]  # the second adapter really replaced the first
    assert not (server["root"] / "sync" / "policy-v0").exists()  # superseded adapters are removed
    rollout.unload(name)
    assert _served(server) == ["demo"]


def test_unreachable_or_refusing_servers_give_clear_errors(server, tmp_path):
    dead = ServerRollout("http://127.0.0.1:9/v1", tmp_path, [0], timeout_s=5)
    with pytest.raises(RolloutServerError, match="unreachable"):
        dead.generate([[1, 2]], [SamplingParams()], model="x")
    no_key = ServerRollout(server["url"], tmp_path, [0])
    with pytest.raises(RolloutServerError, match="HTTP 401"):
        no_key.generate([[1, 2]], [SamplingParams()], model="x")


def test_grpo_with_server_rollouts(server, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_API_KEY", KEY)
    body = {"recipe": "grpo", "model": str(server["demo"]), "output_dir": str(tmp_path / "srv"),
            "data": {"train": str(ROOT / "examples" / "data" / "arith_rl.jsonl")},
            "lora": {"r": 4, "alpha": 8},
            "grpo": {"prompts_per_step": 2},
            "rollout": {"backend": "server", "base_url": server["url"], "num_generations": 4, "max_new_tokens": 4,
                        "adapter_dir": str(server["root"] / "grpo")},
            "train": {"max_steps": 2, "batch_size": 8, "lr": 5e-3, "seed": 3}}
    (tmp_path / "cfg.yaml").write_text(json.dumps(body))
    lines = []
    grpo.run(load_config(tmp_path / "cfg.yaml"), log=lines.append)
    steps = reward_steps(tmp_path / "srv")
    assert [r["step"] for r in steps] == [1, 2]
    # The server reported the sampled tokens' log-probs; the trainer's agree with them.
    assert all(r["logprob_gap"] < 1e-5 for r in steps)
    assert _served(server) == ["demo"]  # the run unloaded its last adapter when done
    assert (tmp_path / "srv" / "adapter" / "adapter_model.safetensors").is_file()


def test_policy_sampler_serves_one_adapter_per_step(server):
    # What is checked is which adapter the server serves at each step; the in-process engine on the
    # same weights tells them apart (the tests above check the server itself against transformers).
    tokenizer = load_tokenizer(server["demo"])
    policy = load_model(server["demo"], dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(policy, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    engine = Engine(policy, tokenizer)
    sampler = PolicySampler(ServerRollout(server["url"], server["root"] / "sampler", [tokenizer.eos_token_id],
                                          api_key=KEY, name="run"), policy, "default")
    prompt = tokenizer("12+7=")["input_ids"]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)

    def local():
        done = engine.generate([Request(prompt, "default", greedy)])[0]
        return done.token_ids + ([done.stop_token_id] if done.stop_token_id is not None else [])

    with pytest.raises(RuntimeError, match="before sync"):
        sampler.generate([prompt], [greedy])
    randomize_lora(policy, seed=1, scale=0.3)
    first = local()
    sampler.sync(0)
    assert _served(server)[1:] == ["run-step0"]
    assert sampler.generate([prompt], [greedy])[0].token_ids == first
    randomize_lora(policy, seed=2, scale=0.3)
    assert local() != first
    sampler.sync(0)  # already synced for step 0: nothing is sent
    assert sampler.generate([prompt], [greedy])[0].token_ids == first
    sampler.sync(1)
    assert _served(server)[1:] == ["run-step1"]
    assert sampler.generate([prompt], [greedy])[0].token_ids == local()
    sampler.close()
    assert _served(server) == ["demo"]


def _server_config(server, tmp_path, name, steps=3, **rollout):
    return grpo_config(tmp_path, server["demo"], name, {"backend": "server", "base_url": server["url"], "max_new_tokens": 4,
                                                        "adapter_dir": str(server["root"] / name), **rollout}, steps)


def test_async_rollouts_are_one_step_stale_and_corrected_by_the_ratio(server, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_API_KEY", KEY)
    synced = []
    real_sync = ServerRollout.sync
    monkeypatch.setattr(ServerRollout, "sync", lambda self, update: (synced.append(update.version), real_sync(self, update)))
    grpo.run(_server_config(server, tmp_path, "async", steps=4, **{"async": True}), log=lambda _: None)
    steps = reward_steps(tmp_path / "async")
    # Step 1 samples synchronously; each later step trains on rollouts its predecessor's policy drew.
    assert [r["staleness"] for r in steps] == [0, 1, 1, 1]
    assert [r["policy_version"] for r in steps] == [0, 0, 1, 2]
    assert synced == [0, 1, 2]  # no adapter is synced for a step that never comes
    # The trainer's log-probs under the adapter that sampled each batch (one version back) are the
    # server's: the check compares like with like however stale the batch is by design.
    assert all(r["logprob_gap"] < 1e-5 for r in steps), [r["logprob_gap"] for r in steps]
    assert _served(server) == ["demo"]


def _lively_adapter(server, tmp_path):
    """A random rank-4 adapter (the GRPO runs' shape) under which the demo model's samples vary at T=0.7."""
    path = tmp_path / "lively"
    if not path.exists():
        policy = load_model(server["demo"], dtype=torch.float32, device=torch.device("cpu"))
        inject_lora(policy, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        randomize_lora(policy, seed=1, scale=1.0)
        save_adapter(policy, path)
    return path


def _replaced_after_sync(monkeypatch, version):
    """After the trainer's sync of ``version``, a second client (as a second run with the same output
    dir name would) loads the previous version's weights under the same adapter name: the real server
    then serves the previous adapter under the name the trainer samples."""
    real_sync, kept = ServerRollout.sync, {}

    def sync(self, update):
        kept[update.version] = {k: v.clone() for k, v in update.tensors.items()}
        real_sync(self, update)
        if update.version == version:
            other = ServerRollout(self.base_url, self.adapter_dir / "other-run", [0], api_key=self.api_key)
            other.load(self.current, update.config, kept[version - 1])  # "already loaded": it unloads, reloads

    monkeypatch.setattr(ServerRollout, "sync", sync)


@pytest.mark.parametrize("mode", [{"temperature": 0.7}, {"async": True}])
def test_a_server_serving_the_previous_adapter_is_caught(server, tmp_path, monkeypatch, mode):
    monkeypatch.setenv("LORAKIT_API_KEY", KEY)
    _replaced_after_sync(monkeypatch, version=2)
    # async samples step 4's groups with the adapter synced after step 2 trains; sync mode, step 3's
    stale_step = 4 if "async" in mode else 3

    def config(name, **more):
        cfg = _server_config(server, tmp_path, name, steps=4, **mode, **more)
        if "temperature" in mode:  # the bare demo model repeats one token at T=0.7: start from a livelier adapter
            cfg.init_adapter = str(_lively_adapter(server, tmp_path))
        return cfg

    with pytest.raises(StaleRolloutError, match=rf"step {stale_step}: the ServerRollout rollout backend reports holding adapter"):
        grpo.run(config("stale"), log=lambda _: None)
    steps = reward_steps(tmp_path / "stale")
    assert [r["step"] for r in steps] == list(range(1, stale_step))
    assert min(r["zero_std_frac"] for r in steps) < 1  # it trains: each version's adapter differs from the last

    # warn: the run goes on, and the log-prob check (untempered, under the adapter that sampled the
    # batch) independently finds the same step, and only it
    lines = []
    grpo.run(config("stale-warn", check_sync="warn"), log=lines.append)
    warned = [line for line in lines if "Warning: rollout.check_sync" in line]
    assert len(warned) == 2 and all(f"step {stale_step}:" in line for line in warned), warned
    assert any("reports holding adapter" in line for line in warned)
    assert any("differ by" in line for line in warned)
    gaps = [r["logprob_gap"] for r in reward_steps(tmp_path / "stale-warn")]
    assert gaps[stale_step - 1] > 1e-3 and all(g < 1e-5 for k, g in enumerate(gaps) if k != stale_step - 1), gaps


def test_a_backend_that_never_got_the_sync_trips_the_version_check(server, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_API_KEY", KEY)
    real_sync = ServerRollout.sync
    monkeypatch.setattr(ServerRollout, "sync", lambda self, update: None if update.version == 1 else real_sync(self, update))
    with pytest.raises(StaleRolloutError, match="sampled by policy version 0, but the trainer expected version 1"):
        grpo.run(_server_config(server, tmp_path, "skipped", steps=3), log=lambda _: None)


class _Killed(Exception):
    pass


def test_an_async_run_killed_after_step_2_resumes_exactly(server, tmp_path, monkeypatch):
    # The in-flight rollouts (step 3's, sampled by the adapter of version 2's predecessor while step
    # 2 trained) are in checkpoint-2, so the resumed run trains on the same completions.
    from safetensors.torch import load_file

    monkeypatch.setenv("LORAKIT_API_KEY", KEY)
    # One request at a time: the server's log-probs (async's old log-probs) do not depend on what it batched.
    mode = {"async": True, "concurrency": 1}
    grpo.run(_server_config(server, tmp_path, "whole", steps=4, **mode), log=lambda _: None)
    real_save = grpo.save_checkpoint

    def killed_after_2(out, step, *args, **kwargs):
        real_save(out, step, *args, **kwargs)
        if step == 2:
            raise _Killed

    cut = _server_config(server, tmp_path, "cut", steps=4, **mode)
    cut.train.save_steps = 1
    monkeypatch.setattr(grpo, "save_checkpoint", killed_after_2)
    with pytest.raises(_Killed):
        grpo.run(cut, log=lambda _: None)
    monkeypatch.setattr(grpo, "save_checkpoint", real_save)
    grpo.run(cut, resume=True, log=lambda _: None)

    whole, resumed = reward_steps(tmp_path / "whole"), reward_steps(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    # The resumed run's first step checks the in-flight batch's log-probs too: under the adapter that
    # sampled it, which the checkpoint keeps (without it that step would go unchecked).
    assert all(r["logprob_gap"] < 1e-5 for r in resumed), [r.get("logprob_gap") for r in resumed]
    for a, b in zip(whole, resumed):
        for key in ("reward_mean", "completion_len", "loss", "grad_norm", "policy_version", "staleness"):
            assert a[key] == b[key], (a["step"], key)
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # An async checkpoint resumed without async would not continue the same run: refused.
    sync = _server_config(server, tmp_path, "cut", steps=5)
    with pytest.raises(ValueError, match=r"rollout.async_?: True -> False"):
        grpo.run(sync, resume=True, log=lambda _: None)
