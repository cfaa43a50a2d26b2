"""The docs stay true: the CLI reference is the parser's, the README's workflow commands parse, links resolve."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from clipkd.cli import build_parser, cli_reference

ROOT = Path(__file__).resolve().parent.parent


def test_cli_reference_page_is_generated_from_the_parser():
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert page == cli_reference(), "docs/cli.md is stale: regenerate it with the command at its top"


def test_readme_workflow_commands_parse():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## The workflow in ten lines\n\n```bash\n(.*?)```", text, re.S)
    assert block, "README lost its workflow"
    parser, n = build_parser(), 0
    for line in block.group(1).splitlines():
        line = re.sub(r"\s+#.*$", "", line).replace("$T", "open_clip:a@b").replace("$S", "open_clip:c@d")
        for part in line.split("&&"):
            if part.strip().startswith("clipkd "):
                parser.parse_args(shlex.split(part)[1:])  # exits (fails the test) on an unknown flag
                n += 1
    assert n >= 8
    assert len(text.splitlines()) <= 200, "the README is a guide; reference material goes to docs/"


def test_every_relative_link_in_the_docs_resolves():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if not target.startswith(("http://", "https://", "mailto:")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} → {target}")
    assert broken == []
