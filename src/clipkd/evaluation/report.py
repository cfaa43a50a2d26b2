"""Writing evaluation results: JSON, Markdown tables and PNG plots side by side."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..fileio import write_json
from .plots import plot_gzsl_curves


def write_eval(result: dict[str, Any], out: str | Path) -> Path:
    """Write one ``clipkd eval`` result as JSON, plus its seen–unseen curve PNG when it has one."""
    out = Path(out)
    write_json(out, result)
    if "curve" in result:
        plot_gzsl_curves({Path(result["model"]).name: _curve(result)}, out.with_suffix(".png"))
    return out


def _curve(r: Mapping[str, Any]) -> dict[str, Any]:
    return {"S": r["curve"]["S"], "U": r["curve"]["U"], "ausuc": r["ausuc"], "S0": r["S"], "U0": r["U"]}


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of GZSL results, one row per model."""
    head = "| model | top-1 | S | U | H | H (calibrated, γ) | AUSUC |\n|---|---|---|---|---|---|---|\n"
    rows = []
    for name, r in results.items():
        c, nan = r.get("calibrated", {}), float("nan")
        rows.append(f"| {name} | {r['top1']:.3f} | {r['S']:.3f} | {r['U']:.3f} | {r['H']:.3f} | "
                    f"{c.get('H', nan):.3f} (γ={c.get('gamma', 0.0):.3f}) | {r.get('ausuc', nan):.3f} |")
    return head + "\n".join(rows) + "\n"


def plot_all_curves(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """All models' seen–unseen curves in one PNG."""
    return plot_gzsl_curves({n: _curve(r) for n, r in results.items() if "curve" in r}, path)
