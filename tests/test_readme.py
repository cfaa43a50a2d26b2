"""The README's "From Python" example runs as written (toy sizes), through the public API only."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_from_python_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- from-python -->\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its From Python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {"__name__": "readme"})  # noqa: S102
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"S=\d\.\d{3} U=\d\.\d{3} H=\d\.\d{3}", line), line
    assert (tmp_path / "runs/py/student/student.pt").is_file()
