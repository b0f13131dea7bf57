"""`lorakit generate --compare-base`: the base model's completion, then the adapter's, from one load.

Oracles are independent of lorakit's generation: transformers' greedy ``generate`` on the plain base,
and on the base with the adapter loaded by the real ``peft``.
"""

import pytest
import torch

from lorakit import LoraConfig, inject_lora, save_adapter
from lorakit.cli import main
from lorakit.models import write_demo_model

PROMPT = "Hello there"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def demo_and_adapter(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("compare")
    demo = write_demo_model(root / "demo")
    model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh adapter changes nothing (B = 0): give it weights that change the greedy text
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    save_adapter(model, root / "adapter")
    return demo, root / "adapter"


def _oracle(demo, adapter=None) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo)
    model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_compare_base_prints_the_base_then_the_adapter_completion(demo_and_adapter, capsys):
    demo, adapter = demo_and_adapter
    rc = main(["generate", "--model", str(demo), "--adapter", str(adapter), "--prompt", PROMPT, "--no-chat-template",
               "--max-new-tokens", str(NEW_TOKENS), "--compare-base"])
    assert rc == 0
    base, tuned = _oracle(demo), _oracle(demo, adapter)
    assert base != tuned  # else the test could not tell the two sections apart
    assert capsys.readouterr().out == f"[base {demo}]\n{base}\n[with adapter {adapter}]\n{tuned}\n"


def test_compare_base_without_adapter_is_one_line_error(demo_and_adapter, capsys):
    demo, _ = demo_and_adapter
    assert main(["generate", "--model", str(demo), "--prompt", PROMPT, "--compare-base"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "--compare-base needs --adapter" in err
