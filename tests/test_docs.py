"""The manual (docs/, mkdocs.yml) and the README stay true to the code.

- The generated reference pages are current, and list every config key and CLI flag the code accepts
  (the oracle is the config loader's own key list and the argument parser, not the generator).
- Every shell command in the guides parses with the real parser (and `lorakit train` configs load with
  their overrides); every YAML snippet loads as a config; benchmark commands name flags the script has.
- `mkdocs build --strict` passes (skipped where mkdocs is not installed; CI installs the docs extra).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.cli import build_parser, parse_args
from lorakit.config import KEY_ALIASES, build_config, load_config
from lorakit.config import loader

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"


def _gen_reference():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "scripts" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _guide_pages() -> list[Path]:
    """Hand-written pages (the generated reference is checked separately) and the README."""
    pages = [p for p in sorted(DOCS.rglob("*.md")) if REFERENCE not in p.parents]
    return pages + [ROOT / "README.md"]


def _blocks(path: Path, languages: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, text) of every fenced block in `path` whose language is one of `languages`."""
    out, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)```(\w*)", lines[i])
        if match:
            indent, language, start = len(match.group(1)), match.group(2), i + 1
            i += 1
            body = []
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i][indent:])
                i += 1
            if language in languages:
                out.append((start, "\n".join(body)))
        i += 1
    return out


def test_generated_reference_is_current():
    gen = _gen_reference()
    stale = [str(path.relative_to(ROOT)) for path, text in gen.generate().items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    assert not stale, f"out of date, run `python scripts/gen_reference.py`: {stale}"


def test_config_reference_lists_every_key_and_alias():
    text = (REFERENCE / "config.md").read_text(encoding="utf-8")
    # The loader's own list of the keys it accepts (independent of the generator's walk).
    keys = [key.removesuffix("_") for key in loader._valid_keys() if key != "jobs"]
    for key in loader._job_keys():  # a job's data.* / lora.* keys are the top-level sections' keys
        section = key.split(".")[0]
        keys += [key, f"jobs[].{section}"] if section in ("data", "lora") else [f"jobs[].{key}"]
    missing = [key for key in keys if f"`{key}`" not in text]
    assert not missing, missing
    assert len(keys) > 100
    missing_aliases = [alias for alias in KEY_ALIASES if alias != "rollout.async" and f"`{alias}`" not in text]
    assert not missing_aliases, missing_aliases
    for flag in ("--lora-r", "--lora-alpha", "--lora-dropout", "--lora-target-modules"):
        assert f"`{flag}`" in text


def test_cli_reference_lists_every_command_and_flag():
    import argparse

    text = (REFERENCE / "cli.md").read_text(encoding="utf-8")
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(sub.choices) >= 8
    for name, command in sub.choices.items():
        assert f"## lorakit {name}\n" in text, name
        section = text.split(f"## lorakit {name}\n", 1)[1].split("\n## ", 1)[0]
        for action in command._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}`" in section, (name, option)


def _commands(block: str) -> list[str]:
    """Shell lines of a block: continuations joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _check_command(words: list[str], where: str) -> None:
    """Parse one command as the program it names would; unknown programs (pip, curl) are not checked."""
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # OMP_NUM_THREADS=1 python ...
        words = words[1:]
    if not words:
        return
    if words[0].startswith(".venv/bin/"):  # the Getting started page runs the venv's programs
        words = [words[0].removeprefix(".venv/bin/")] + words[1:]
    if words[0] == "python3":
        words = ["python"] + words[1:]
    if words[0] == "torchrun":
        assert "-m" in words and words[words.index("-m") + 1] == "lorakit", where
        words = ["lorakit"] + words[words.index("-m") + 2:]
    if words[:3] == ["python", "-m", "lorakit"]:
        words = ["lorakit"] + words[3:]
    if words[0] == "lorakit":
        try:
            args = parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{' '.join(words)}` does not parse")
        if args.command == "train":
            assert (ROOT / args.config).is_file(), f"{where}: no config {args.config}"
            load_config(ROOT / args.config, args.overrides)
        return
    if words[:3] == ["python", "-m", "lorakit.integrations.megatron"]:
        from lorakit.integrations.megatron import build_parser as megatron_parser

        megatron_parser().parse_args(words[3:])
        return
    if words[0] in ("python", "bash") and len(words) > 1 and words[1].endswith((".py", ".sh")):
        script = ROOT / words[1]
        assert script.is_file(), f"{where}: no script {words[1]}"
        source = script.read_text(encoding="utf-8")
        for word in words[2:]:
            flag = word.split("=", 1)[0]
            if flag.startswith("--"):
                assert f'"{flag}"' in source, f"{where}: {words[1]} has no flag {flag}"


def test_shell_snippets_parse_with_the_real_parsers():
    checked = 0
    for path in _guide_pages():
        for line, block in _blocks(path, ("bash", "sh", "shell")):
            for command in _commands(block):
                for part in re.split(r"\s*&&\s*", command):
                    _check_command(shlex.split(part, comments=True), f"{path.relative_to(ROOT)}:{line}")
                    checked += 1
    # The README's tour gives one command per job inline, in a table.
    for command in re.findall(r"`((?:lorakit|torchrun) [^` ]+ [^`]+)`", (ROOT / "README.md").read_text(encoding="utf-8")):
        _check_command(shlex.split(command), f"README.md: `{command}`")
        checked += 1
    assert checked >= 40


def test_yaml_snippets_load_as_configs():
    yaml = pytest.importorskip("yaml")
    checked = 0
    for path in _guide_pages():
        for line, block in _blocks(path, ("yaml",)):
            if "--8<--" in block:  # an included shipped config: tests/test_config.py loads it
                continue
            try:
                build_config(loader.flatten(yaml.safe_load(block)))
            except Exception as err:  # noqa: BLE001 - name the snippet
                pytest.fail(f"{path.relative_to(ROOT)}:{line}: {err}")
            checked += 1
    assert checked >= 3


def test_python_snippets_are_valid_python_naming_real_api():
    import ast
    import importlib

    checked = 0
    for path in _guide_pages():
        for line, block in _blocks(path, ("python",)):
            where = f"{path.relative_to(ROOT)}:{line}"
            try:
                tree = ast.parse(block)
            except SyntaxError as err:
                pytest.fail(f"{where}: {err}")
            for node in ast.walk(tree):  # every `from lorakit... import name` names something that exists
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorakit"):
                    module = importlib.import_module(node.module)
                    missing = [a.name for a in node.names if not hasattr(module, a.name)]
                    assert not missing, f"{where}: {node.module} has no {missing}"
            checked += 1
    assert checked >= 4


def test_snippet_includes_name_shipped_files():
    for path in _guide_pages():
        for name in re.findall(r'^\s*--8<-- "([^"]+)"', path.read_text(encoding="utf-8"), re.M):
            assert (ROOT / name).is_file(), f"{path.relative_to(ROOT)} includes a missing {name}"


def test_readme_is_short_and_keeps_its_quick_start():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 12 * 1024
    # .ci/run and the pre-stop hook read the two command lines of this block.
    block = readme.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = block.strip().splitlines()
    assert len(lines) == 2 and "lorakit train" in lines[0] and "pytest" in lines[1]


def test_readme_links_point_at_existing_pages():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in link]
    assert links
    missing = [link for link in links if link and not (ROOT / link).exists()]
    assert not missing, missing


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()
