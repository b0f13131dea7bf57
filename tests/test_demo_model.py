"""`model: demo` (and `--model demo`) is lorakit's demo model, built once into a cache; a model path
that does not exist is an error naming it, never a freshly written random model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _lorakit(*args, cache=None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"LORAKIT_CACHE": str(cache)} if cache else {})}
    return subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT, **kwargs)


def _weights(directory):
    return load_file(Path(directory) / "model.safetensors")


def test_a_missing_model_path_is_an_error_that_names_it(tmp_path):
    missing = tmp_path / "path" / "that" / "does" / "not" / "exist"
    proc = _lorakit("train", QUICKSTART, f"model={missing}", f"output_dir={tmp_path / 'run'}", "train.max_steps=1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: model '{missing}': no such directory" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "path").exists(), "a model was written at the mistyped path"
    assert not (tmp_path / "run" / "adapter").exists()
    for command in ("generate", "merge", "serve"):
        extra = {"generate": ["--prompt", "hi"], "merge": ["--adapter", tmp_path, "--out", tmp_path / "m"],
                 "serve": ["--port", "0"]}[command]
        proc = _lorakit(command, "--model", missing, *extra)
        assert proc.returncode == 2 and f"model '{missing}': no such directory" in proc.stderr, proc.stderr


def test_create_demo_model_is_refused_with_the_way_forward(tmp_path):
    from lorakit.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: out/m\ncreate_demo_model: true\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: 'create_demo_model' was removed .*write 'model: demo'"):
        load_config(path)
    path.write_text("model: out/m\ncreate_demo_model: false\n")  # what older runs' config.yaml hold
    assert load_config(path).model == "out/m"


def test_demo_resolves_to_one_cached_copy_of_the_demo_model(tmp_path):
    from lorakit.models import resolve_model

    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    assert _lorakit("demo-model", reference).returncode == 0
    # several processes ask at once (as torchrun ranks do): one copy, whole, and nothing left behind
    code = "from lorakit.models import ensure_demo_model; print(ensure_demo_model())"
    env = {**os.environ, "LORAKIT_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    built = Path(paths.pop())
    assert built.parent == cache and built.name.startswith("demo-model")
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [built.name]
    ref, got = _weights(reference), _weights(built)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # transformers' own loader reads back exactly the model that was built (tied head included)
    from transformers import AutoModelForCausalLM

    from lorakit.models import build_demo_model

    loaded = AutoModelForCausalLM.from_pretrained(built).state_dict()
    fresh = build_demo_model(loaded["model.embed_tokens.weight"].shape[0], seed=0).state_dict()
    assert loaded.keys() == fresh.keys() and all(torch.equal(loaded[k], fresh[k]) for k in fresh)
    os.environ["LORAKIT_CACHE"], saved = str(cache), os.environ["LORAKIT_CACHE"]
    try:
        assert resolve_model("demo") == str(built)
    finally:
        os.environ["LORAKIT_CACHE"] = saved


def test_quickstart_style_run_and_generate_with_model_demo(tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    proc = _lorakit("train", QUICKSTART, f"output_dir={out}", "train.max_steps=2", cache=cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Building lorakit's demo model" in proc.stdout
    assert "model: demo" in (out / "config.yaml").read_text()  # the run records the name, not a cache path
    again = _lorakit("train", QUICKSTART, f"output_dir={tmp_path / 'again'}", "train.max_steps=1", cache=cache)
    assert again.returncode == 0 and "Building lorakit's demo model" not in again.stdout
    gen = _lorakit("generate", "--model", "demo", "--adapter", out / "adapter", "--prompt", "Who are you?",
                   "--max-new-tokens", "6", cache=cache)
    assert gen.returncode == 0, gen.stderr
    # the same completion from the cached directory named explicitly
    built = next(p for p in cache.iterdir() if p.name.startswith("demo-model"))
    direct = _lorakit("generate", "--model", built, "--adapter", out / "adapter", "--prompt", "Who are you?",
                      "--max-new-tokens", "6", cache=cache)
    assert direct.returncode == 0 and direct.stdout == gen.stdout


def test_two_torchrun_ranks_share_the_first_build(tmp_path):
    cache = tmp_path / "cache"
    proc = _lorakit("train", QUICKSTART, "--nproc", "2", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                    "train.batch_size=2", cache=cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "batch 2 x 2 rank(s)" in proc.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert len([p for p in cache.iterdir() if not p.name.endswith(".lock")]) == 1


def test_demo_config_names_its_architecture_so_servers_pick_the_causal_lm(tmp_path):
    # vLLM (and transformers' pipelines) resolve the model class from config.json's `architectures`;
    # without it vLLM loads the bare Qwen3Model as a pooling model and refuses to generate.
    from lorakit.models.demo import write_demo_model

    for moe in (False, True):
        path = write_demo_model(tmp_path / f"m{moe}", moe=moe)
        config = json.loads((path / "config.json").read_text())
        expected = "Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"
        assert config.get("architectures") == [expected], config.get("architectures")


def test_merge_sets_the_config_dtype_without_the_deprecated_name(tmp_path, caplog):
    # transformers 5 renamed config.torch_dtype to config.dtype and logs a deprecation for the old name.
    import transformers

    from lorakit.lora import LoraConfig, inject_lora, save_adapter
    from lorakit.models import load_model, write_demo_model
    from lorakit.models.export import export_merged

    demo = write_demo_model(tmp_path / "demo")
    model = load_model(demo, dtype=torch.float32, device=torch.device("cpu"))
    inject_lora(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "adapter")
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            export_merged(demo, tmp_path / "adapter", tmp_path / "merged", dtype="bf16")
    finally:
        transformers.logging.disable_propagation()
    assert not [r for r in caplog.records if "torch_dtype" in r.getMessage()]
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
