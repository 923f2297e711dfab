"""The README's code blocks run as written: Python parses and names what exists, shell commands name existing files
and flags that the example scripts accept. Nothing is executed; YAML keys are checked in tests/test_examples.py."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest
from trl import TrlParser

import trl_selfdistill

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
# Arguments starting with these name files of this repository (other paths, such as outputs, are made by runs).
REPO_PREFIXES = ("examples/", "tools/", "benchmarks/", ".ci/", "tests/", "trl_selfdistill/")
CONFIG_CLASSES = {
    "SDFTConfig": trl_selfdistill.SDFTConfig,
    "DynSDPBConfig": trl_selfdistill.DynSDPBConfig,
    "SDFTDynSDPBConfig": trl_selfdistill.SDFTDynSDPBConfig,
}


def code_blocks(languages: tuple[str, ...]) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w+)\n(.*?)^```", README, re.S | re.M) if m.group(1) in languages]


PYTHON_BLOCKS = code_blocks(("python",))
SHELL_BLOCKS = code_blocks(("bash", "sh", "shell"))


def shell_commands() -> list[list[str]]:
    commands = []
    for block in SHELL_BLOCKS:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


COMMANDS = shell_commands()


def test_extraction_found_the_blocks():
    # A broken extractor would otherwise let every check below pass on nothing.
    assert len(PYTHON_BLOCKS) >= 3 and len(SHELL_BLOCKS) >= 3
    assert len(COMMANDS) >= 8
    assert any("examples/sdft.py" in command for command in COMMANDS)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda block: block.splitlines()[0][:40])
def test_python_block(block: str):
    tree = ast.parse(compile(block, "README.md", "exec", flags=ast.PyCF_ONLY_AST))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trl_selfdistill":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CONFIG_CLASSES:
            fields = {field.name for field in dataclasses.fields(CONFIG_CLASSES[node.func.id])}
            for keyword in node.keywords:
                assert keyword.arg in fields, f"{node.func.id} has no field {keyword.arg}"


@cache
def script_options(script: str) -> frozenset[str]:
    """Option strings of an example script's parser, built from the dataclasses its `__main__` gives `TrlParser`."""
    path = ROOT / script
    sys.path.insert(0, str(path.parent))  # the scripts import each other by plain module name
    try:
        module = importlib.import_module(path.stem)
    finally:
        sys.path.remove(str(path.parent))
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "TrlParser":
            classes = tuple(getattr(module, element.id) for element in node.args[0].elts)
            # `--config` is taken out by `TrlParser.parse_args_and_config` itself, before argparse sees the rest.
            return frozenset(TrlParser(classes)._option_string_actions) | {"--config"}
    raise AssertionError(f"{script} builds no TrlParser")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command)[:60])
def test_shell_command(command: list[str]):
    for word in command:
        if word.startswith(REPO_PREFIXES):
            assert (ROOT / word).exists(), f"{word} does not exist"
    scripts = [i for i, word in enumerate(command) if word.startswith("examples/") and word.endswith(".py")]
    if not scripts:
        return  # another program's flags (pip, vllm, accelerate's own) are its business
    script = command[scripts[0]]
    options = script_options(script)
    for word in command[scripts[0] + 1 :]:
        if word.startswith("--"):
            assert word.split("=", 1)[0] in options, f"{script} does not accept {word}"
