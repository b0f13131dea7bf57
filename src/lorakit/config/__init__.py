"""Run configuration: typed dataclasses, YAML load/dump, key=value overrides, seed aliases."""

from .loader import ConfigError, KEY_ALIASES, build_config, dump_config, job_run_config, load_config, parse_override, seed_flag_overrides
from .schema import DataSection, JobSection, JobTrainSection, LoraSection, RunConfig, TrainSection

__all__ = [
    "ConfigError", "KEY_ALIASES", "build_config", "dump_config", "job_run_config", "load_config", "parse_override",
    "seed_flag_overrides", "DataSection", "JobSection", "JobTrainSection", "LoraSection", "RunConfig", "TrainSection",
]
