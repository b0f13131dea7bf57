from pathlib import Path

import pytest

from lorakit.cli import build_parser
from lorakit.config import ConfigError, build_config, load_config, seed_flag_overrides

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(path)
        assert cfg.model and (cfg.data.train or (cfg.jobs and all(job.data.train for job in cfg.jobs))), path


def test_unknown_key_names_file_line_and_closest_key(tmp_path):
    path = _write(tmp_path, "model: m\ndata:\n  train: d.jsonl\ntrain:\n  batch_size: 2\n  lrr: 1e-4\n")
    with pytest.raises(ConfigError, match=r"c.yaml:6: unknown key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_config(path)


def test_wrong_type_and_invalid_value(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:2: 'train.batch_size': expected an integer, got 'four'"):
        load_config(_write(tmp_path, "train:\n  batch_size: four\n"))
    with pytest.raises(ConfigError, match=r"'train.lr_scheduler': expected one of \['linear', 'cosine', 'constant'\]"):
        load_config(None, ["train.lr_scheduler=step"])
    with pytest.raises(ConfigError, match=r"c.yaml:2: lora.r must be a positive integer"):
        load_config(_write(tmp_path, "lora:\n  r: 0\n"))
    with pytest.raises(ConfigError, match=r"c.yaml:4: invalid YAML: .*flow sequence started at line 3"):
        load_config(_write(tmp_path, "model: m\ntrain:\n  lr: [1\n"))


def test_overrides_are_dotted_and_typed(tmp_path):
    cfg = load_config(_write(tmp_path, "model: m\ntrain:\n  lr: 1e-3\n"),
                      ["lora.r=16", "train.lr=2e-4", "lora.target_modules=[q_proj,v_proj]", "train.packing=true"])
    assert cfg.lora.r == 16 and cfg.train.lr == 2e-4 and cfg.train.packing is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"override 'lora.rank=3': unknown key 'lora.rank' \(did you mean 'lora.r'\?\)"):
        load_config(None, ["lora.rank=3"])


def test_seed_aliases_land_on_the_same_config(tmp_path):
    canonical = load_config(_write(tmp_path, "model: m\nlora:\n  r: 32\n  alpha: 32\n  target_modules: [o_proj, q_proj]\n"))
    # 004_*.txt YAML keys at the top level
    yaml_alias = load_config(_write(tmp_path, "model: m\nlora_target: o_proj,q_proj\nlora_rank: 32\nlora_alpha: 32\n"))
    assert yaml_alias == canonical
    # the same keys inside the lora section, and as overrides
    assert load_config(_write(tmp_path, "model: m\nlora:\n  lora_target: o_proj,q_proj\n  lora_rank: 32\n  lora_alpha: 32\n")) == canonical
    assert load_config(None, ["model=m", "lora_target=o_proj,q_proj", "lora_rank=32", "lora_alpha=32"]) == canonical
    # 000/002 CLI flags, parsed by the real `lorakit train` parser
    args = build_parser().parse_args(["train", "c.yaml", "model=m", "--use-lora", "--lora-r", "32", "--lora-alpha", "32",
                                      "--lora-target-modules", "o_proj", "q_proj", "--lora-only-trainable"])
    extra = seed_flag_overrides(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    flags = load_config(None, args.overrides, extra)
    assert flags == canonical
    dropout = build_parser().parse_args(["train", "c.yaml", "--lora-dropout", "0.1"])
    assert load_config(None, [], seed_flag_overrides(lora_dropout=dropout.lora_dropout)).lora.dropout == 0.1


def test_alias_and_canonical_key_together_is_an_error():
    with pytest.raises(ConfigError, match="'lora_rank' sets 'lora.r', which is already set"):
        build_config({"lora.r": 8, "lora_rank": 16})


def test_rollout_engine_is_read_as_rollout_backend(tmp_path):
    # The key's name before "engine" meant only lorakit's generation engine: old configs and flags still work.
    from lorakit.recipes import grpo
    from lorakit.rl import RolloutBackend, RolloutEngine

    assert load_config(None, ["rollout.engine=server"]).rollout.backend == "server"
    old = load_config(_write(tmp_path, "model: m\nrollout:\n  engine: vllm\n"))
    assert old == load_config(None, ["model=m", "rollout.backend=vllm"])
    with pytest.raises(ConfigError, match="'rollout.engine' sets 'rollout.backend', which is already set"):
        build_config({"rollout.backend": "local", "rollout.engine": "vllm"})
    assert RolloutEngine is RolloutBackend and grpo.rollout_engine is grpo.rollout_backend


def test_string_overrides_are_taken_as_written():
    cfg = load_config(None, ["model=m", "data.system_prompt=Be brief. #1 rule: no jokes", "output_dir=2024"])
    assert cfg.data.system_prompt == "Be brief. #1 rule: no jokes" and cfg.output_dir == "2024"
    assert load_config(None, ["train.lr=2e-4"]).train.lr == 2e-4


def test_nonsense_limits_are_refused():
    with pytest.raises(ConfigError, match="save_total_limit' must be >= 1"):
        load_config(None, ["train.save_total_limit=-1"])
    with pytest.raises(ConfigError, match="'train.lr' must be finite"):
        load_config(None, ["train.lr=.inf"])
    with pytest.raises(ConfigError, match="'output_dir' must not be empty"):
        load_config(None, ["output_dir="])


def test_overrides_may_follow_flags(capsys):
    from lorakit.cli import main

    # an unknown key named in the error proves the late override reached the config loader
    assert main(["train", "/dev/null", "--resume", "lora.rr=3"]) == 2
    assert "unknown key 'lora.rr' (did you mean 'lora.r'?)" in capsys.readouterr().err


def test_later_sources_override_earlier_ones_by_alias_and_empty_sections_are_fine(tmp_path):
    path = _write(tmp_path, "model: m\nlora:\n  r: 16\ntrain:\n")
    assert load_config(path, ["lora_rank=8"]).lora.r == 8
    assert load_config(_write(tmp_path, "model: m\nlora: {}\n")).lora.r == 16
