"""What the lean install costs on disk next to the full one: the virtual environments ``make test`` builds.

    python bench_install.py --out results/install.md

``.venv`` holds ``pip install -e '.[all,test]'`` (PyTorch, the training stack, every backend and the test tools);
``.venv-lean`` holds ``pip install -e '.[serve]'``, what a search server of exported models needs. Sizes are the
files under each environment (pip's own included), in MiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from common import report, table

ROOT = Path(__file__).resolve().parent.parent  # the checkout: its .venv and .venv-lean


def size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


def packages(folder: Path) -> list[str]:
    out = subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(p["name"] for p in json.loads(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/install.md")
    a = ap.parse_args()
    rows, raw = [], {}
    for name, extra in ((".venv", "all,test"), (".venv-lean", "serve")):
        env = (ROOT / name).resolve()
        if not (env / "bin" / "python").is_file():
            raise SystemExit(f"{env}: run make test first (it builds both environments)")
        pkgs = packages(env)
        raw[name] = {"extras": extra, "mib": round(size_mib(env), 1), "packages": pkgs}
        rows.append({"environment": name, "install": f"pip install -e '.[{extra}]'", "MiB": f"{raw[name]['mib']:,.0f}",
                     "packages": len(pkgs), "torch": "yes" if "torch" in pkgs else "no"})
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2))
    body = table(rows, list(rows[0])) + (
        f"\n\nThe lean environment is {raw['.venv-lean']['mib'] / raw['.venv']['mib']:.2f}× the full one on disk; "
        "its packages: " + ", ".join(raw[".venv-lean"]["packages"]) + ".\n")
    report("Installed size: the lean server against everything", body, out)


if __name__ == "__main__":
    main()
