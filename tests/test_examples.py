import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_quick_lora_example_runs_and_writes_a_loadable_adapter(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quick_lora.py"), "--out", str(tmp_path / "ad"),
                           "--steps", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "reloaded into a fresh base: max |logit diff| = 0.00e+00" in proc.stdout
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    # Oracle for the saved file: the real peft loads it into the example's base and gets the losses it printed.
    peft = pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("quick_lora", ROOT / "examples" / "quick_lora.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    base_printed, lora_printed = map(float, re.search(r"loss on the pattern: base ([0-9.]+) -> base\+LoRA ([0-9.]+)",
                                                      proc.stdout).groups())
    pattern = torch.arange(10, 42).repeat(4)[None, :]
    with torch.no_grad():
        base_loss = example.build_model().eval()(input_ids=pattern, labels=pattern).loss.item()
        adapted = peft.PeftModel.from_pretrained(example.build_model(), tmp_path / "ad").eval()
        lora_loss = adapted(input_ids=pattern, labels=pattern).loss.item()
    assert base_loss == pytest.approx(base_printed, abs=1e-3)
    assert lora_loss == pytest.approx(lora_printed, abs=1e-3)
    assert lora_loss < base_loss - 0.1  # five steps already learn some of the pattern


def test_smollm2_arith_data_is_reproducible_disjoint_and_right(tmp_path):
    """The shipped RL demo data is what its generator writes; the splits share no problem; every answer
    (and the last number of every SFT reply, which numeric_match reads) is the sum or difference the
    question asks for, recomputed here from the question's text."""
    import json

    from lorakit.rl.rewards import numeric_match

    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "make_smollm2_arith_data.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    words = {"+": "+", "plus": "+", "add": "+", "sum": "+", "-": "-", "minus": "-", "subtract": "-", "away": "-",
             "difference": "-"}

    def solve(question: str) -> tuple[tuple[int, int, str], int]:
        a, b = map(int, re.findall(r"\d+", question))
        op = {words[w] for w in re.findall(r"[+-]|\b(?:plus|add|sum|minus|subtract|away|difference)\b", question)}
        assert len(op) == 1, question
        op = op.pop()
        if "subtract" in question or "away" in question:  # "subtract b from a", "take b away from a"
            a, b = b, a
        return (a, b, op), a + b if op == "+" else a - b

    problems = {}
    for name in ("smollm2_arith_sft.jsonl", "smollm2_arith_rl.jsonl", "smollm2_arith_eval.jsonl"):
        text = (tmp_path / name).read_text()
        assert text == (ROOT / "examples" / "data" / name).read_text(), f"{name} differs from its generator's output"
        problems[name] = set()
        for line in text.splitlines():
            record = json.loads(line)
            if "messages" in record:
                question, reply = record["messages"][0]["content"], record["messages"][1]["content"]
                key, answer = solve(question)
                assert numeric_match(question, reply, answer=str(answer)) == 1.0, reply
            else:
                key, answer = solve(record["prompt"])
                assert record["answer"] == str(answer), record
            assert 10 <= key[0] <= 99 and 10 <= key[1] <= 99 and answer >= 0
            problems[name].add(key)
    sizes = [len(p) for p in problems.values()]
    assert sizes == [200, 1000, 100]  # no duplicate within a file either
    assert len(set().union(*problems.values())) == sum(sizes)
