"""LoraConfig: the adapter's hyper-parameters, and its `adapter_config.json` (PEFT) form."""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

ALL_LINEAR = "all-linear"
CONFIG_NAME = "adapter_config.json"

# A comma-separated list of module names ("o_proj,q_proj,k_proj,v_proj", the YAML form of seed 004)
# is told apart from a regex by its alphabet: names, dots and commas only.
_NAME_LIST = re.compile(r"[\w.]+(\s*,\s*[\w.]+)*")

# Names lorakit gives a field -> the name PEFT writes in adapter_config.json.
_TO_PEFT = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
_FROM_PEFT = {v: k for k, v in _TO_PEFT.items()}


def _is_inert(value: Any) -> bool:
    return value in (None, False, {}, [], "none")


# Keys PEFT writes for LoRA features lorakit does not implement. An adapter may carry them only with
# an inert value (None / False / {} ...); any other value changes the math and is refused, not ignored.
_PEFT_UNSUPPORTED = (
    "lora_bias", "loftq_config", "megatron_config", "layer_replication",
    "trainable_token_indices", "use_qalora", "corda_config",
    "lora_ga_config", "velora_config", "arrow_config", "kasa_config", "monteclora_config",
    "alora_invocation_tokens", "use_bdlora",
)
# Initialisations that only shape the first weights (a saved adapter is plain LoRA) vs. those that
# also rewrite the base model (the adapter is meaningless on the original base).
_INIT_ONLY = ("orthogonal", "eva")
_BASE_CHANGING = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Of those, the ones lorakit implements (lora/residual.py): init_lora_weights "pissa",
# "pissa_niter_<N>" (randomised SVD with N subspace iterations) and "olora".
_RESIDUAL_INIT = re.compile(r"pissa|pissa_niter_[0-9]+|olora")


def is_residual_init(init: object) -> bool:
    """Whether ``init_lora_weights`` is an initialisation that turns the base weights into a residual."""
    return isinstance(init, str) and _RESIDUAL_INIT.fullmatch(init) is not None
# Keys PEFT writes that carry bookkeeping only; any value is accepted and not kept.
_PEFT_BOOKKEEPING = (
    "peft_version", "auto_mapping", "revision", "inference_mode", "megatron_core",
    "qalora_group_size", "runtime_config", "ensure_weight_tying", "eva_config",
)
# What lorakit writes for the keys above, so that PEFT and vLLM read a complete config.
_PEFT_DEFAULTS: dict[str, Any] = {
    "lora_bias": False, "loftq_config": {}, "megatron_config": None,
    "megatron_core": "megatron.core", "layer_replication": None, "trainable_token_indices": None,
    "use_qalora": False, "qalora_group_size": 16, "eva_config": None,
    "corda_config": None, "lora_ga_config": None, "velora_config": None, "arrow_config": None,
    "kasa_config": None, "monteclora_config": None, "alora_invocation_tokens": None,
    "use_bdlora": None, "auto_mapping": None, "revision": None, "inference_mode": True,
    "ensure_weight_tying": False,
}

Targets = Union[list[str], str, None]


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter.

    The adapter adds ``B(A(dropout(x))) * scale`` to a frozen layer's output, with
    ``scale = alpha / r`` (or ``alpha / sqrt(r)`` when ``use_rslora``).
    """

    r: int = 8
    """Rank of the update: A is (r, in_features), B is (out_features, r)."""
    alpha: float = 16.0
    """Scaling numerator; PEFT's ``lora_alpha``. ``alpha = 2 * r`` is a common choice."""
    dropout: float = 0.0
    """Dropout probability on the LoRA branch input, in [0, 1); PEFT's ``lora_dropout``."""
    target_modules: Targets = ALL_LINEAR
    """Modules to wrap: a list of exact names or dotted suffixes (``["q_proj", "v_proj"]``), a
    comma-separated string of them (``"o_proj,q_proj"``), a regex matched against the full module
    path, or ``"all-linear"`` (every Linear / GPT-2 Conv1D except the output head)."""
    exclude_modules: Targets = None
    """Modules never wrapped, in the same forms as ``target_modules`` (no ``"all-linear"``)."""
    target_parameters: Union[list[str], None] = None
    """Parameters to adapt that no ``nn.Linear`` holds (PEFT's key): fused MoE expert weights such as
    ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`` (each expert gets its own A and B), or a
    router's ``"mlp.gate.weight"``. Matched as full ``<module>.<parameter>`` paths or dotted tails.
    None with ``target_modules="all-linear"``: every fused expert weight (routers stay out);
    ``[]``: none."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``."""
    init_lora_weights: Union[bool, str] = True
    """True: A kaiming-uniform(a=sqrt(5)), B zero. ``"gaussian"``: A ~ N(0, 1/r), B zero.
    False: both random (the adapter is not a no-op; for tests). ``"pissa"`` / ``"pissa_niter_<N>"``:
    A and B from the top-r singular vectors of the base weight (exact SVD / randomised with N
    iterations); ``"olora"``: from its QR decomposition. Those two also turn the base weight into the
    residual ``W - scale * B @ A`` (so the model is unchanged); ``save_adapter`` converts such an
    adapter to plain LoRA for the untouched base (see ``lora.residual``)."""
    use_dora: bool = False
    """DoRA: a trained per-output-feature magnitude times the normalised ``W + scale * B @ A``
    (PEFT's ``use_dora``; Linear, GPT-2 Conv1D and Embedding layers, the latter per embedding dimension)."""
    layers_to_transform: Union[list[int], int, None] = None
    """Only wrap modules inside these layer indices (``...layers.<i>...``)."""
    layers_pattern: Union[list[str], str, None] = None
    """Name of the layer list for ``layers_to_transform`` (default: layers, h, blocks, layer)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides: regex matched against the end of the module path."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: regex matched against the end of the module path."""
    modules_to_save: Union[list[str], None] = None
    """Modules trained in full (a trainable copy per adapter), e.g. ``["lm_head"]``."""
    fan_in_fan_out: bool = False
    """Set when the wrapped weights are stored (in, out), as GPT-2's Conv1D; detected per layer."""
    bias: str = "none"
    """Which biases to train; only ``"none"`` is supported (PEFT's default, the one vLLM serves)."""
    task_type: Union[str, None] = None
    """PEFT task type written to the config (e.g. ``"CAUSAL_LM"``); informational."""
    base_model_name_or_path: Union[str, None] = None
    """The base model the adapter was trained on; informational."""

    def __post_init__(self) -> None:
        self.target_modules = _normalise_targets(self.target_modules, "target_modules")
        self.exclude_modules = _normalise_targets(self.exclude_modules, "exclude_modules")
        if self.exclude_modules == ALL_LINEAR:
            raise ValueError("LoraConfig.exclude_modules cannot be 'all-linear'")
        if isinstance(self.target_parameters, str):
            if not _NAME_LIST.fullmatch(self.target_parameters.strip()):
                raise ValueError("LoraConfig.target_parameters must be a list of parameter names, "
                                 f"got {self.target_parameters!r}")
            self.target_parameters = [p.strip() for p in self.target_parameters.split(",")]
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = _normalise_targets(self.modules_to_save, "modules_to_save")
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        _check_types(self)
        _check_rank("r", self.r)
        _check_positive("alpha", self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for key, value in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            _check_positive(f"alpha_pattern[{key!r}]", value)
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR and self.layers_to_transform:
            raise ValueError("LoraConfig.layers_to_transform cannot be combined with a regex target_modules "
                             "(PEFT refuses it too): put the layer index into the regex")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("LoraConfig.layers_pattern needs layers_to_transform (PEFT refuses it otherwise)")
        if self.init_lora_weights not in (True, False, "gaussian") and not is_residual_init(self.init_lora_weights):
            raise ValueError(
                "LoraConfig.init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<N>' or 'olora', "
                f"got {self.init_lora_weights!r}"
            )
        if self.use_dora and is_residual_init(self.init_lora_weights):
            raise ValueError(f"LoraConfig.init_lora_weights={self.init_lora_weights!r} cannot be combined with use_dora: "
                             "the conversion to plain LoRA on the original base is not defined for DoRA")
        if self.bias != "none":
            raise ValueError(f"LoraConfig.bias: only 'none' is supported, got {self.bias!r}")

    # --- per-module values -------------------------------------------------------------------
    def rank_for(self, module_path: str) -> int:
        """The rank for the module at ``module_path`` (``rank_pattern`` first, then ``r``)."""
        key = _pattern_key(self.rank_pattern, module_path)
        return self.r if key is None else int(self.rank_pattern[key])

    def alpha_for(self, module_path: str) -> float:
        """The alpha for the module at ``module_path`` (``alpha_pattern`` first, then ``alpha``)."""
        key = _pattern_key(self.alpha_pattern, module_path)
        return self.alpha if key is None else float(self.alpha_pattern[key])

    # --- PEFT dict / JSON ----------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        """The complete ``adapter_config.json`` content, as PEFT writes it."""
        out: dict[str, Any] = dict(_PEFT_DEFAULTS)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "alpha":
                value = _int_if_integral(value)
            if f.name == "alpha_pattern":
                value = {k: _int_if_integral(v) for k, v in value.items()}
            out[_TO_PEFT.get(f.name, f.name)] = value
        if self.target_parameters and self.dropout:
            # PEFT refuses lora_dropout != 0 next to target_parameters. Dropout acts only while
            # training, so the saved adapter says 0 and loads everywhere with the same outputs.
            out["lora_dropout"] = 0.0
        out["peft_type"] = "LORA"
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "LoraConfig", residual_ok: bool = False) -> "LoraConfig":
        """Build a config from lorakit field names or PEFT's ``adapter_config.json`` keys.

        ``residual_ok`` accepts a PiSSA/OLoRA init that was not converted to plain LoRA (a training
        checkpoint, which also holds the initial weights that rebuild the residual base).

        Raises:
            ValueError: naming ``source`` and the key, for an unknown key, a LoRA variant lorakit
                does not implement (DoRA, LoftQ, ...), or an invalid value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        known = names | set(_FROM_PEFT) | set(_PEFT_UNSUPPORTED) | set(_PEFT_BOOKKEEPING) | {"peft_type"}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                hint = difflib.get_close_matches(key, sorted(known), n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise ValueError(f"{source}: unknown key '{key}'{suggestion}")
            if key == "peft_type":
                if value not in ("LORA", None):
                    raise ValueError(f"{source}: peft_type is {value!r}; lorakit reads LORA adapters only")
            elif key in _PEFT_UNSUPPORTED:
                if not _is_inert(value):
                    raise ValueError(f"{source}: '{key}' = {value!r} is a LoRA variant lorakit does not support")
            elif key in _PEFT_BOOKKEEPING:
                continue
            else:
                name = _FROM_PEFT.get(key, key)
                if name in kwargs:
                    raise ValueError(f"{source}: '{key}' given twice (as '{name}' and '{_TO_PEFT.get(name, name)}')")
                kwargs[name] = value
        init = kwargs.get("init_lora_weights")
        if isinstance(init, str) and init.lower() in _INIT_ONLY:
            kwargs["init_lora_weights"] = True  # only shaped the first weights; the file holds the trained ones
        elif residual_ok and is_residual_init(init):
            pass
        elif isinstance(init, str) and init.lower().startswith(_BASE_CHANGING):
            raise ValueError(
                f"{source}: init_lora_weights={init!r} also rewrites the base model's weights, so this adapter "
                "only works on that modified base; convert it to plain LoRA in PEFT first "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...))"
            )
        if kwargs.get("rank_pattern") is None:
            kwargs.pop("rank_pattern", None)
        if kwargs.get("alpha_pattern") is None:
            kwargs.pop("alpha_pattern", None)
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
        except (TypeError, AttributeError, re.error) as err:  # a value of the wrong type deep inside a check
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "LoraConfig":
        """Read an ``adapter_config.json`` (a file, or a directory that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        return cls.from_dict(read_json_object(path), source=str(path))

    def to_json_string(self) -> str:
        return json.dumps(self.to_peft_dict(), indent=2, sort_keys=True) + "\n"


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse a JSON file holding one object; errors name the file (and line for bad JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such adapter config") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def split_variants(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate the keys of LoRA variants lorakit does not implement (DoRA, LoftQ, ...) when set."""
    variants = {k: v for k, v in data.items() if k in _PEFT_UNSUPPORTED and not _is_inert(v)}
    return {k: v for k, v in data.items() if k not in variants}, variants


def _normalise_targets(value: Targets, name: str) -> Targets:
    if value is None:
        return None
    if isinstance(value, str):
        if value.lower() == ALL_LINEAR:
            return ALL_LINEAR
        if _NAME_LIST.fullmatch(value.strip()):
            return [part.strip() for part in value.split(",")]
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"LoraConfig.{name}: {value!r} is not a valid regex ({err})") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not all(isinstance(v, str) and v for v in items):
            raise ValueError(f"LoraConfig.{name}: every entry must be a non-empty string, got {items!r}")
        return items
    raise ValueError(f"LoraConfig.{name}: expected a list of names, a string or None, got {value!r}")


def _check_types(cfg: "LoraConfig") -> None:
    def fail(name: str, expected: str) -> None:
        raise ValueError(f"LoraConfig.{name} must be {expected}, got {getattr(cfg, name)!r}")

    for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if not isinstance(getattr(cfg, name), bool):
            fail(name, "true or false")
    ltt = cfg.layers_to_transform
    if ltt is not None and not (isinstance(ltt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ltt)):
        fail("layers_to_transform", "a list of layer indices")
    lp = cfg.layers_pattern
    if lp is not None and not isinstance(lp, str) and not (isinstance(lp, list) and all(isinstance(x, str) for x in lp)):
        fail("layers_pattern", "a name or a list of names")
    tps = cfg.target_parameters
    if tps is not None and not (isinstance(tps, list) and all(isinstance(x, str) and x for x in tps)):
        fail("target_parameters", "a list of parameter names")
    mts = cfg.modules_to_save
    if mts is not None and not (isinstance(mts, list) and all(isinstance(x, str) and x for x in mts)):
        fail("modules_to_save", "a list of module names")
    for name in ("rank_pattern", "alpha_pattern"):
        value = getattr(cfg, name)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            fail(name, "a mapping of module-name patterns to numbers")
        for key in value:
            try:
                re.compile(key)
            except re.error as err:
                raise ValueError(f"LoraConfig.{name}: key {key!r} is not a valid regex ({err})") from None
    for name in ("task_type", "base_model_name_or_path"):
        if getattr(cfg, name) is not None and not isinstance(getattr(cfg, name), str):
            fail(name, "a string")


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LoraConfig.{name} must be a positive integer, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"LoraConfig.{name} must be a positive number, got {value!r}")


def _int_if_integral(value: float) -> Union[int, float]:
    return int(value) if float(value).is_integer() else value


def _pattern_key(patterns: dict[str, Any], module_path: str) -> Union[str, None]:
    # PEFT's rule: a key matches when it matches the whole path or a dotted tail of it.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_path):
            return key
    return None
