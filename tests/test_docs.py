"""Documentation stays complete: a section with a python example for every hook, a section for every CLI verb,
and example code on the plugin pages that at least parses."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from dspark_lab import cli, hookspecs
from dspark_lab.output import SCHEMA_VERSION

DOCS = Path(__file__).resolve().parent.parent / "docs"


def sections(page: str) -> dict[str, str]:
    """``## title`` -> the text up to the next ``## `` heading."""
    parts = re.split(r"^## +(.+?)\s*$", (DOCS / page).read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("dspark_"))


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_section_with_a_python_example(hook):
    section = sections("plugins.md").get(hook)
    assert section is not None, f"docs/plugins.md has no '## {hook}' section"
    blocks = code_blocks(section, "python")
    assert blocks, f"docs/plugins.md '## {hook}' has no ```python example"
    assert any(f"def {hook}(" in block for block in blocks), f"the example of {hook} does not implement it"


def cli_verbs() -> list[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


def test_every_cli_verb_has_a_section():
    missing = [verb for verb in cli_verbs() if verb not in sections("cli.md")]
    assert not missing, f"docs/cli.md has no section for: {', '.join(missing)}"


def test_core_verbs_document_their_json_shape():
    page = sections("cli.md")
    for verb in ("backends", "kernels", "doctor"):
        shape = json.loads(code_blocks(page[verb], "json")[0])
        assert (shape["schema_version"], shape["kind"]) == (SCHEMA_VERSION, verb)


@pytest.mark.parametrize("page", ["plugins.md", "writing_a_backend.md"])
def test_python_examples_parse(page):
    blocks = code_blocks((DOCS / page).read_text(), "python")
    assert blocks
    for block in blocks:
        ast.parse(block)
