"""The `lorakit` command line."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Optional, Sequence


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def cmd_inspect(args: argparse.Namespace) -> int:
    from .lora.describe import describe_adapter, vllm_problems

    desc = describe_adapter(args.adapter)
    cfg = desc.config
    scale = cfg.alpha / (cfg.r ** 0.5 if cfg.use_rslora else cfg.r)
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else ", ".join(cfg.target_modules or [])
    print(f"Adapter: {desc.path}")
    print(f"  r={cfg.r}  alpha={cfg.alpha:g}  scale={scale:g}{' (rsLoRA)' if cfg.use_rslora else ''}  dropout={cfg.dropout:g}")
    print(f"  target_modules: {targets}")
    if cfg.exclude_modules:
        print(f"  exclude_modules: {cfg.exclude_modules}")
    if cfg.rank_pattern or cfg.alpha_pattern:
        print(f"  rank_pattern: {cfg.rank_pattern}  alpha_pattern: {cfg.alpha_pattern}")
    if cfg.modules_to_save:
        print(f"  modules_to_save: {', '.join(cfg.modules_to_save)}")
    if desc.variants:
        print("  variants lorakit does not load: " + ", ".join(f"{k}={v}" for k, v in desc.variants.items()))
    if cfg.base_model_name_or_path:
        print(f"  base model: {cfg.base_model_name_or_path}")
    ranks = Counter(desc.ranks.values())
    print(f"  wrapped modules: {len(desc.ranks)}  ranks: " + ", ".join(f"r={r} x{n}" for r, n in sorted(ranks.items())))
    paths = sorted(desc.ranks)
    shown = paths if args.all else paths[:20]
    for path in shown:
        print(f"    {path}  r={desc.ranks[path]}")
    if len(shown) < len(paths):
        print(f"    ... {len(paths) - len(shown)} more (--all lists every one)")
    if desc.other_keys:
        print(f"  other tensors: {len(desc.other_keys)} (" + ", ".join(desc.other_keys[:5]) + (", ..." if len(desc.other_keys) > 5 else "") + ")")
    print(f"  parameters: {desc.num_params:,}")
    print(f"  file size: {_human_bytes(desc.file_bytes)}")
    if args.check == "vllm":
        problems = vllm_problems(desc)
        if problems:
            print("vLLM check: FAILED")
            for problem in problems:
                print(f"  - {problem}")
            return 1
        print("vLLM check: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning for large language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="describe an adapter directory (config, modules, ranks, size)")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--check", choices=["vllm"], help="list what the named server would refuse; exit 1 if anything")
    p.add_argument("--all", action="store_true", help="list every wrapped module")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        # A user mistake (bad path, bad config) gets one line, not a traceback.
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
