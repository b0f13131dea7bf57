"""YAML <-> typed config: strict keys with suggestions, dotted overrides, and the seeds' spellings."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from .schema import DataSection, JobSection, JobTrainSection, LoraSection, RunConfig


class ConfigError(ValueError):
    """A user mistake in a config file, an override or a flag; the message names where."""


# Seed spellings (004_*.txt YAML keys; 000/002 flags) -> canonical dotted keys.
KEY_ALIASES = {
    "lora_target": "lora.target_modules",
    "lora_rank": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora.lora_target": "lora.target_modules",
    "lora.lora_rank": "lora.r",
    "lora.lora_alpha": "lora.alpha",
    "lora.lora_dropout": "lora.dropout",
    "rollout.async": "rollout.async_",  # a Python keyword: the field is async_
    "rollout.engine": "rollout.backend",  # its name before "engine" meant only the generation engine
}


def _yaml():
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml ships with the hf extra
        raise ConfigError("reading YAML configs needs pyyaml: pip install 'lorakit[hf]'") from None
    return yaml


def _key_lines(node: Any, prefix: str = "") -> dict[str, int]:
    """Map dotted keys of a YAML mapping to their 1-based line numbers."""
    yaml = _yaml()
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    elif isinstance(node, yaml.SequenceNode):  # list items as "jobs.0", their keys as "jobs.0.name"
        for index, item in enumerate(node.value):
            lines[f"{prefix}{index}"] = item.start_mark.line + 1
            lines.update(_key_lines(item, f"{prefix}{index}."))
    return lines


def read_yaml(path: Union[str, Path]) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML mapping; returns it and the line of each dotted key."""
    yaml = _yaml()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        started = f" ({context} started at line {context_mark.line + 1})" if context and context_mark else ""
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}{started}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data, lines


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; dict-typed fields stay whole."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and _is_section(dotted):
            out.update(flatten(value, dotted + "."))
        elif value is None and _is_section(dotted) and dotted in {f.name for f in dataclasses.fields(RunConfig)}:
            continue  # an empty section (`lora:` with nothing under it) sets nothing
        else:
            out[dotted] = value
    return out


def _is_section(dotted: str) -> bool:
    cls: Any = RunConfig
    for part in dotted.split("."):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return True  # unknown: let the strict check name it
        cls = hints[part]
    return dataclasses.is_dataclass(cls)


def _valid_keys(cls: Any = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += _valid_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=2e-4"`` -> ``("train.lr", 0.0002)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected key=value, e.g. train.lr=2e-4")
    yaml = _yaml()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def seed_flag_overrides(
    lora_r: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    lora_dropout: Optional[float] = None,
    lora_target_modules: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """The seeds' CLI flags (--lora-r ...) as canonical overrides."""
    out: dict[str, Any] = {}
    if lora_r is not None:
        out["lora.r"] = lora_r
    if lora_alpha is not None:
        out["lora.alpha"] = lora_alpha
    if lora_dropout is not None:
        out["lora.dropout"] = lora_dropout
    if lora_target_modules:
        out["lora.target_modules"] = list(lora_target_modules)
    return out


def load_config(
    path: Optional[Union[str, Path]] = None,
    overrides: Sequence[str] = (),
    extra: Optional[dict[str, Any]] = None,
) -> RunConfig:
    """Build a RunConfig from a YAML file, ``key=value`` overrides and already-parsed overrides.

    Raises:
        ConfigError: naming the file and line (or the override) of an unknown key, with the
            closest valid key, or of a value of the wrong type.
    """
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    if path is not None:
        data, lines = read_yaml(path)
        for key, value in flatten(data).items():
            flat[key] = value
            where[key] = f"{path}:{lines.get(key, 1)}"
        where.update({key: f"{path}:{line}" for key, line in lines.items() if key.startswith("jobs.")})
    raw: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        flat[key] = value
        raw[key] = text.partition("=")[2]
        where[key] = f"override '{text}'"
    for key, value in (extra or {}).items():
        flat[key] = value
        where[key] = f"flag for '{key}'"
    return build_config(flat, where, raw)


def build_config(flat: dict[str, Any], where: Optional[dict[str, str]] = None,
                 raw: Optional[dict[str, str]] = None) -> RunConfig:
    """Typed config from dotted keys. ``raw`` holds overrides' unparsed text: a string field takes it
    as written (so 'data.system_prompt=Be brief. #1 rule' keeps its '#')."""
    where, raw = where or {}, raw or {}
    valid = _valid_keys()
    canonical: dict[str, Any] = {}
    for key, value in flat.items():
        name = KEY_ALIASES.get(key, key)
        origin = where.get(key, "config")
        if name == "create_demo_model":  # removed; `false` (older runs' config.yaml) meant nothing anyway
            if value not in (False, None):
                raise ConfigError(f"{origin}: 'create_demo_model' was removed (it wrote a random model wherever "
                                  "'model' pointed, so a mistyped path trained one): write 'model: demo' for "
                                  "lorakit's demo model")
            continue
        if name not in valid:
            hint = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{origin}: unknown key '{key}'{suggestion}")
        if name in canonical and name != key and _source(canonical[name][1]) == _source(origin):
            raise ConfigError(f"{origin}: '{key}' sets '{name}', which is already set")
        if key in raw and _takes_text(name) and not (value is None and _optional(name)):
            value = raw[key]  # `key=null` still clears an optional path
        canonical[name] = (value, origin)
    jobs = canonical.pop("jobs", None)
    cfg = RunConfig()
    for name, (value, origin) in canonical.items():
        section: Any = cfg
        parts = name.split(".")
        for part in parts[:-1]:
            section = getattr(section, part)
        hint = typing.get_type_hints(type(section))[parts[-1]]
        try:
            setattr(section, parts[-1], coerce(value, hint))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{origin}: '{name}': {err}") from None
    _validate(cfg, {name: origin for name, (_, origin) in canonical.items()})
    if jobs is not None:
        cfg.jobs = _build_jobs(jobs[0], jobs[1], canonical, where)
    return cfg


def _job_keys() -> set[str]:
    """Dotted keys a job of ``jobs:`` may set (the rest of a run is shared by all its jobs)."""
    keys = {"name", "recipe", "init_adapter"}
    keys |= {f"data.{f.name}" for f in dataclasses.fields(DataSection)}
    keys |= {f"lora.{f.name}" for f in dataclasses.fields(LoraSection)}
    keys |= {f"train.{f.name}" for f in dataclasses.fields(JobTrainSection)}
    return keys


_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _build_jobs(items: Any, origin: str, top: dict[str, tuple[Any, str]], where: dict[str, str]) -> list[JobSection]:
    """Typed jobs from the ``jobs:`` list: each job's keys over the top-level ones, validated like a
    run of its own; errors name the file and line of the key and the job."""
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{origin}: 'jobs' must be a list of jobs (mappings with a name), got {items!r}")
    allowed = _job_keys()
    inherited = {name: entry for name, entry in top.items() if name in allowed and name != "recipe"}
    jobs: list[JobSection] = []
    seen: dict[str, str] = {}
    for index, item in enumerate(items):
        at = where.get(f"jobs.{index}", origin)
        if not isinstance(item, dict):
            raise ConfigError(f"{at}: jobs[{index}] must be a mapping with at least a name, got {item!r}")
        name = item.get("name")
        if not isinstance(name, str) or not _JOB_NAME.fullmatch(name):
            raise ConfigError(f"{where.get(f'jobs.{index}.name', at)}: jobs[{index}] needs a 'name' of letters, digits, "
                              f"'-' and '_' (its adapter name and output folder), got {name!r}")
        if name in seen:
            raise ConfigError(f"{where.get(f'jobs.{index}.name', at)}: job name '{name}' is used twice (first at {seen[name]})")
        seen[name] = where.get(f"jobs.{index}.name", at)
        flat = {k: value for k, (value, _) in inherited.items()}
        job_where = {k: o for k, (_, o) in inherited.items()}
        for key, value in flatten(item).items():
            key_at = f"{where.get(f'jobs.{index}.{key}', at)} (job '{name}')"
            canonical_key = KEY_ALIASES.get(key, key)
            if canonical_key not in allowed:
                if canonical_key in _valid_keys():
                    raise ConfigError(f"{key_at}: '{key}' is shared by all jobs; set it at the top level")
                hint = difflib.get_close_matches(canonical_key, sorted(allowed), n=1, cutoff=0.6)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ConfigError(f"{key_at}: unknown key '{key}' for a job{suggestion}")
            if canonical_key == "recipe" and value != "sft":
                raise ConfigError(f"{key_at}: 'recipe': only sft jobs can share a run so far, got {value!r}")
            if canonical_key == "name":
                continue
            flat.pop(canonical_key, None)  # a job's own spelling wins over the top level's
            flat[key], job_where[key] = value, key_at
        run = build_config(flat, job_where)
        jobs.append(JobSection(
            name=name, recipe="sft", init_adapter=run.init_adapter, data=run.data, lora=run.lora,
            train=JobTrainSection(**{f.name: getattr(run.train, f.name) for f in dataclasses.fields(JobTrainSection)})))
    return jobs


def job_run_config(cfg: RunConfig, job: JobSection) -> RunConfig:
    """The single-run config equivalent to ``job`` of ``cfg``: its own settings, the shared ones,
    and ``output_dir/<name>`` (what the job records in its checkpoints, and what ``lorakit train``
    would run to train that adapter alone)."""
    run = copy.deepcopy(cfg)
    run.jobs = []
    run.recipe = job.recipe
    run.output_dir = str(Path(cfg.output_dir) / job.name)
    run.init_adapter = job.init_adapter
    run.data, run.lora = copy.deepcopy(job.data), copy.deepcopy(job.lora)
    for f in dataclasses.fields(JobTrainSection):
        setattr(run.train, f.name, getattr(job.train, f.name))
    return run


_POSITIVE = ("train.batch_size", "train.grad_accum", "train.max_seq_len", "train.lr", "train.epochs", "train.logging_steps",
             "grpo.prompts_per_step", "grpo.num_iterations", "grpo.mini_batches", "grpo.max_prompt_len",
             "rollout.temperature", "rollout.top_p", "rollout.max_new_tokens", "rollout.max_batch", "rollout.timeout_s",
             "rollout.concurrency")
_NON_NEGATIVE = ("train.save_steps", "train.eval_steps", "train.weight_decay", "train.max_grad_norm",
                 "grpo.clip_eps_low", "grpo.clip_eps_high", "grpo.beta", "rollout.top_k")


def _validate(cfg: RunConfig, where: dict[str, str]) -> None:
    def fail(name: str, message: str) -> None:
        raise ConfigError(f"{where.get(name, 'config')}: '{name}' {message}")

    for name in _POSITIVE + _NON_NEGATIVE:
        section, field_name = name.split(".")
        value = getattr(getattr(cfg, section), field_name)
        if name in _POSITIVE and not value > 0:
            fail(name, f"must be > 0, got {value!r}")
        if name in _NON_NEGATIVE and value < 0:
            fail(name, f"must be >= 0, got {value!r}")
    if cfg.train.max_steps is not None and cfg.train.max_steps <= 0:
        fail("train.max_steps", f"must be > 0, got {cfg.train.max_steps!r}")
    if cfg.train.save_total_limit is not None and cfg.train.save_total_limit < 1:
        fail("train.save_total_limit", f"must be >= 1 (or null to keep all), got {cfg.train.save_total_limit!r}")
    ratio = cfg.train.loraplus_lr_ratio
    if ratio is not None and not (math.isfinite(ratio) and ratio > 0):
        fail("train.loraplus_lr_ratio", f"must be a number > 0 (B's lr / A's lr), or null, got {ratio!r}")
    if not math.isfinite(cfg.train.lr):
        fail("train.lr", f"must be finite, got {cfg.train.lr!r}")
    if not cfg.output_dir:
        fail("output_dir", "must not be empty")
    if not 0.0 <= cfg.train.warmup_ratio < 1.0:
        fail("train.warmup_ratio", f"must be in [0, 1), got {cfg.train.warmup_ratio!r}")
    if cfg.train.fsdp_replicate < 1:
        fail("train.fsdp_replicate", f"must be >= 1 (HSDP replica groups; 1: plain FSDP2), got {cfg.train.fsdp_replicate!r}")
    for name, on in (("train.cpu_offload", cfg.train.cpu_offload), ("train.fsdp_replicate", cfg.train.fsdp_replicate > 1)):
        if on and cfg.train.distributed != "fsdp2":
            fail(name, f"needs train.distributed: fsdp2 (it shapes how FSDP2 shards the base), got "
                 f"train.distributed: {cfg.train.distributed}")
    if cfg.rollout.top_p > 1.0:
        fail("rollout.top_p", f"must be in (0, 1], got {cfg.rollout.top_p!r}")
    if cfg.recipe == "grpo":
        if cfg.rollout.num_generations < 2:
            fail("rollout.num_generations", f"must be >= 2: advantages compare completions of the same prompt, got "
                 f"{cfg.rollout.num_generations!r}")
        if cfg.grpo.clip_eps_low >= 1.0:
            fail("grpo.clip_eps_low", f"must be < 1 (the ratio's lower bound is 1 - clip_eps_low), got {cfg.grpo.clip_eps_low!r}")
        if cfg.rollout.backend == "server" and not cfg.rollout.base_url:
            fail("rollout.base_url", "is required with rollout.backend=server (e.g. http://127.0.0.1:8000/v1)")
        _validate_rollout(cfg, fail)
        if not cfg.grpo.rewards:
            fail("grpo.rewards", "must name at least one reward, e.g. {numeric_match: 1.0}")
        bad = [k for k, w in cfg.grpo.rewards.items() if not math.isfinite(w)]
        if bad:
            fail("grpo.rewards", f"weights must be finite numbers: {bad}")
    _validate_variants(cfg, fail)
    try:
        lora = cfg.lora.to_lora_config()
    except ValueError as err:
        field_name = str(err).split()[0].removeprefix("LoraConfig.").split("[")[0]
        name = f"lora.{field_name}"
        raise ConfigError(f"{where.get(name, 'config')}: {str(err).replace('LoraConfig.', 'lora.')}") from None
    cfg.lora.target_modules = lora.target_modules  # "o_proj,q_proj" and [o_proj, q_proj] are one config
    cfg.lora.target_parameters = lora.target_parameters
    rc = cfg.rollout
    if cfg.recipe == "grpo" and rc.backend == "vllm" and rc.sync == "lora" and not cfg.init_adapter:
        _validate_vllm_rank(lora, fail)  # init_adapter's own config: checked by the recipe before any model loads
    if cfg.recipe == "grpo" and rc.backend == "vllm" and rc.sync == "lora":
        _validate_vllm_targets(lora, fail)


def _validate_variants(cfg: RunConfig, fail: Any) -> None:
    """Refuse LoRA-variant combinations that neither lorakit nor PEFT supports, before any model loads."""
    residual = isinstance(cfg.lora.init_lora_weights, str) and cfg.lora.init_lora_weights.startswith(("pissa", "olora"))
    if cfg.quantization and residual:
        fail("lora.init_lora_weights", f"= {cfg.lora.init_lora_weights!r} rewrites the base weights and cannot be combined "
             f"with quantization: {cfg.quantization} (PEFT refuses it too); drop one of the two keys")
    if cfg.quantization and cfg.train.distributed == "fsdp2":
        fail("quantization", f"= {cfg.quantization} with train.distributed: fsdp2 is not supported: bitsandbytes' packed "
             "4-bit parameters are not sharded by FSDP2 here; use train.distributed: ddp (or none)")
    if cfg.quantization and cfg.lora.modules_to_save:
        fail("quantization", f"= {cfg.quantization} with lora.modules_to_save: a quantized module cannot be trained in "
             "full; leave lora.modules_to_save empty")
    if residual and cfg.init_adapter:
        fail("lora.init_lora_weights", f"= {cfg.lora.init_lora_weights!r} initialises a new adapter; with init_adapter "
             "the loaded adapter's own config applies, so drop lora.init_lora_weights")
    if cfg.recipe == "grpo" and residual:
        reference = cfg.grpo.reference if cfg.grpo.reference != "auto" else ("init_adapter" if cfg.init_adapter else "base")
        if reference == "base" and (cfg.grpo.beta > 0 or cfg.grpo.log_kl):
            fail("lora.init_lora_weights", f"= {cfg.lora.init_lora_weights!r} turns the base into a residual, so "
                 "grpo.reference: base would not be the original model; set grpo.beta: 0 and grpo.log_kl: false, "
                 "or use init_lora_weights: true")


def _source(origin: str) -> str:
    """The file of 'path:line', or 'override'/'flag': a later source may override an earlier one."""
    return origin.split(" ")[0] if origin.startswith(("override", "flag")) else origin.rsplit(":", 1)[0]


def _optional(name: str) -> bool:
    section: Any = RunConfig
    for part in name.split("."):
        section = typing.get_type_hints(section)[part]
    return type(None) in typing.get_args(section)


def _takes_text(name: str) -> bool:
    section: Any = RunConfig
    for part in name.split("."):
        section = typing.get_type_hints(section)[part]
    if typing.get_origin(section) not in (Union, types.UnionType):
        return section is str  # dict[str, float] holds strings, but is not one
    args = typing.get_args(section)
    return str in args and not any(typing.get_origin(a) in (list, dict) for a in args)


def coerce(value: Any, hint: Any) -> Any:
    """Check ``value`` against a type hint, converting only where lossless (int -> float, '1e-4')."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError(f"expected {_describe(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"expected one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return [coerce(v, item) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        return {coerce(k, key_hint): coerce(v, value_hint) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "2e-4" as a string
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    names = []
    for arg in args:
        if typing.get_origin(arg) is list:
            names.append("a list")
        elif typing.get_origin(arg) is Literal:
            names.append(" or ".join(repr(c) for c in typing.get_args(arg)))
        else:
            names.append(getattr(arg, "__name__", str(arg)))
    return " or ".join(names)


def _validate_rollout(cfg: RunConfig, fail) -> None:
    rc = cfg.rollout
    if rc.async_ and rc.backend == "local":
        fail("rollout.async", "needs rollout.backend server or vllm: the local backend samples on the trainer's own "
             "weights, so it cannot sample while they train")
    if rc.async_ and rc.temperature != 1.0:
        fail("rollout.async", "needs rollout.temperature: 1 (the importance ratio uses the sampler's log-probs, "
             f"which rollout backends report for the raw distribution), got temperature {rc.temperature!r}")
    if rc.sync == "merged" and rc.backend != "vllm":
        fail("rollout.sync", f"merged needs rollout.backend: vllm (got {rc.backend!r})")
    if rc.max_logprob_gap is not None and not rc.max_logprob_gap > 0:
        fail("rollout.max_logprob_gap", f"must be > 0 (or null for the default), got {rc.max_logprob_gap!r}")
    if not 0.0 < rc.vllm.gpu_memory_utilization <= 1.0:
        fail("rollout.vllm.gpu_memory_utilization", f"must be in (0, 1], got {rc.vllm.gpu_memory_utilization!r}")
    if rc.vllm.tensor_parallel_size < 1:
        fail("rollout.vllm.tensor_parallel_size", f"must be >= 1, got {rc.vllm.tensor_parallel_size!r}")
    if rc.vllm.max_model_len is not None and rc.vllm.max_model_len < 1:
        fail("rollout.vllm.max_model_len", f"must be >= 1 (or null), got {rc.vllm.max_model_len!r}")


def _validate_vllm_rank(config: Any, fail: Any) -> None:
    """vLLM serves LoRA up to its largest max_lora_rank; the adapter it receives may be larger than lora.r."""
    from ..lora.vllm_format import VLLM_MAX_LORA_RANKS, served_rank, vllm_max_lora_rank

    rank = served_rank(config)
    if vllm_max_lora_rank(rank) is None:
        why = [f"lora.r={config.r}"]
        if config.rank_pattern:
            why.append(f"lora.rank_pattern up to {max(config.rank_pattern.values())}")
        if rank > max([config.r, *config.rank_pattern.values()]):
            why.append(f"lora.init_lora_weights={config.init_lora_weights!r} (handed over as plain LoRA of twice the rank)")
        fail("lora.r", f"{', '.join(why)}: vLLM receives a rank-{rank} adapter, over {VLLM_MAX_LORA_RANKS[-1]}, the "
             "largest max_lora_rank vLLM accepts; use rollout.sync: merged or a smaller rank")


def _validate_vllm_targets(config: Any, fail: Any) -> None:
    """vLLM applies LoRA to linear layers and MoE expert weights only: a router (or any other raw
    parameter in target_parameters) would fail the first hand-over, after everything has loaded."""
    from ..lora.vllm_format import VLLM_EXPERT_PARAMETERS

    for name in config.target_parameters or []:
        if name.rsplit(".", 1)[-1] not in VLLM_EXPERT_PARAMETERS:
            fail("lora.target_parameters", f"'{name}': vLLM's LoRA covers only MoE expert weights "
                 f"({' / '.join(VLLM_EXPERT_PARAMETERS)}) among target_parameters, not a router or another raw "
                 "parameter; use rollout.sync: merged (vLLM then receives the merged weights) or leave it out")


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML (what a run records in output_dir/config.yaml)."""
    data = dataclasses.asdict(cfg)
    if not data["jobs"]:
        del data["jobs"]  # a single run's record reads as before
    data["rollout"] = {("async" if k == "async_" else k): v for k, v in data["rollout"].items()}
    return _yaml().safe_dump(data, sort_keys=False, allow_unicode=True)
