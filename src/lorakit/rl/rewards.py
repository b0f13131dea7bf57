"""Verifiable rewards: pure functions ``reward(prompt, completion, **fields) -> float``.

``fields`` are the other keys of the prompt's JSONL record (``answer``, ``nums``, ``target`` ...).
A reward never raises on a model's output: a missing or malformed answer scores 0. Built in:

- ``numeric_match``: the completion's final number equals ``answer`` (``\\boxed{}``, then ``####``,
  then ``<answer>`` tags, then the last number in the text).
- ``answer_format``: the completion is ``[<think>...</think>] <answer>...</answer>`` and nothing more.
- ``countdown``: the ``<answer>`` equation uses each of ``nums`` exactly once and evaluates to
  ``target`` (parsed with ``ast``, evaluated with exact fractions; no ``eval``).

User rewards are named ``module:function``. A reward that sets ``fn.defines_accuracy = True`` (the
built-in correctness rewards do) counts as accuracy: the fraction of completions scoring >= 1.
"""

from __future__ import annotations

import ast
import importlib
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Mapping, Optional, Sequence

RewardFn = Callable[..., float]

_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # never closed: no answer


def _to_fraction(token: str) -> Optional[Fraction]:
    try:
        return Fraction(token.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def extract_number(text: str) -> Optional[Fraction]:
    """The completion's final numeric answer, exactly, or None when it gives none.

    Looks, in order, inside the last ``\\boxed{}``, after the last ``####``, inside the last
    ``<answer>...</answer>``, and finally at the last number anywhere in the text. A fraction
    ``a/b`` in a box or tag counts as its value.
    """
    candidates = []
    boxed = _boxed(text)
    if boxed is not None:
        candidates.append(boxed)
    if "####" in text:
        candidates.append(text.rsplit("####", 1)[1])
    tags = _ANSWER_TAG.findall(text)
    if tags:
        candidates.append(tags[-1])
    for part in candidates:
        frac = re.fullmatch(rf"\s*-?\\d?frac\{{\s*({_NUMBER})\s*\}}\{{\s*({_NUMBER})\s*\}}\s*", part)
        if frac:
            num, den = _to_fraction(frac.group(1)), _to_fraction(frac.group(2))
            if num is not None and den:
                return (-1 if part.strip().startswith("-") else 1) * num / den
        match = re.fullmatch(rf"\s*\$?\s*({_NUMBER})\s*/\s*({_NUMBER})\s*\.?\s*", part)
        if match:
            num, den = _to_fraction(match.group(1)), _to_fraction(match.group(2))
            if num is not None and den:
                return num / den
        numbers = _NUMBER_RE.findall(part)
        if numbers:
            return _to_fraction(numbers[0] if part is boxed else numbers[-1])
        return None  # an explicit answer slot with no number in it is no answer
    numbers = _NUMBER_RE.findall(text)
    return _to_fraction(numbers[-1]) if numbers else None


def numeric_match(prompt: str, completion: str, answer: Any = None, **_: Any) -> float:
    """1.0 when the completion's final number equals ``answer`` exactly (as a fraction), else 0.0."""
    if answer is None:
        raise ValueError("numeric_match needs an 'answer' field in each prompt record")
    want = extract_number(str(answer)) if not isinstance(answer, (int, float)) else Fraction(answer)
    got = extract_number(completion)
    return 1.0 if want is not None and got is not None and got == want else 0.0


numeric_match.defines_accuracy = True  # type: ignore[attr-defined]

_FORMAT = re.compile(r"\s*(?:<think>(?:(?!</?think>).)*</think>\s*)?<answer>((?:(?!</?answer>).)*)</answer>\s*",
                     re.DOTALL)


def answer_format(prompt: str, completion: str, **_: Any) -> float:
    """1.0 for ``[<think>...</think>] <answer>...</answer>`` with nothing around or nested, else 0.0."""
    match = _FORMAT.fullmatch(completion)
    return 1.0 if match and match.group(1).strip() else 0.0


class _Unsafe(ValueError):
    pass


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of an arithmetic expression tree: integers, + - * /, unary minus, parentheses."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise ZeroDivisionError
        return left / right
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, used)
    raise _Unsafe(type(node).__name__)


def countdown(prompt: str, completion: str, nums: Optional[Sequence[int]] = None, target: Any = None,
              **_: Any) -> float:
    """1.0 when the last ``<answer>`` equation uses each of ``nums`` exactly once and equals ``target``.

    The equation may be ``expr`` or ``expr = target``. Only integers, ``+ - * /`` and parentheses are
    accepted; anything else, a division by zero or a wrong multiset of numbers scores 0.0.
    """
    if nums is None or target is None:
        raise ValueError("countdown needs 'nums' and 'target' fields in each prompt record")
    tags = _ANSWER_TAG.findall(completion)
    if not tags:
        return 0.0
    equation = tags[-1].strip().split("=")[0].replace("×", "*").replace("÷", "/")
    if not equation or len(equation) > 200 or not re.fullmatch(r"[\d\s+\-*/().]+", equation):
        return 0.0
    try:
        tree = ast.parse(equation, mode="eval")
        used: list[int] = []
        value = _evaluate(tree, used)
    except (SyntaxError, _Unsafe, ZeroDivisionError, RecursionError, ValueError):
        return 0.0
    if sorted(used) != sorted(int(n) for n in nums):
        return 0.0
    return 1.0 if value == Fraction(str(target)) else 0.0


countdown.defines_accuracy = True  # type: ignore[attr-defined]

BUILTIN_REWARDS: dict[str, RewardFn] = {
    "numeric_match": numeric_match,
    "answer_format": answer_format,
    "countdown": countdown,
}


def resolve_reward(spec: str) -> RewardFn:
    """A built-in reward by name, or a user function as ``package.module:function``."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward '{spec}': not a built-in ({', '.join(BUILTIN_REWARDS)}) and not 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward '{spec}': cannot import module '{module_name}': {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward '{spec}': module '{module_name}' has no function '{attr}'")
    return fn


@dataclass
class RewardScore:
    """The rewards of one batch of completions."""

    total: list[float]
    """Weighted sum per completion."""
    parts: dict[str, list[float]]
    """Each reward's own score per completion, by name."""
    correct: Optional[list[bool]]
    """Per completion, whether the first accuracy-defining reward scored >= 1 (None: no such reward)."""


class RewardSet:
    """Several rewards combined with weights: ``total = sum(weight * reward)``."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not weights:
            raise ValueError("grpo.rewards: give at least one reward, e.g. {numeric_match: 1.0}")
        self.fns = {name: resolve_reward(name) for name in weights}
        self.weights = {name: float(w) for name, w in weights.items()}
        self.accuracy = next((n for n, fn in self.fns.items() if getattr(fn, "defines_accuracy", False)), None)

    def score(self, prompts: Sequence[str], completions: Sequence[str], fields: Sequence[Mapping[str, Any]]) -> RewardScore:
        parts: dict[str, list[float]] = {}
        for name, fn in self.fns.items():
            values = []
            for prompt, completion, extra in zip(prompts, completions, fields):
                value = float(fn(prompt, completion, **extra))
                if not math.isfinite(value):
                    raise ValueError(f"reward '{name}' returned {value} for completion {completion[:80]!r}")
                values.append(value)
            parts[name] = values
        total = [sum(self.weights[n] * parts[n][i] for n in parts) for i in range(len(completions))]
        correct = [v >= 1.0 for v in parts[self.accuracy]] if self.accuracy else None
        return RewardScore(total, parts, correct)
