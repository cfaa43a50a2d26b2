"""Every figure a reader sees in README.md and docs/ is one its results file holds.

Each table of figures in README.md and docs/*.md must be a copy — rows chosen, columns chosen, bold and code marks
aside, a figure rounded as the page writes it — of tables in committed results files, ``benchmarks/results/*.md``,
which the command that made them writes in the same run as their JSON. A row is found by a results table's key
columns (its first, and as many after it as tell its rows apart: ``world``, ``model``...; the name of
``**`cutmix_fm`** (the method)`` is ``cutmix_fm``); every other column both tables have must hold the same figure,
and a column of figures that the results table lacks fails. A page's table that no results table holds fails,
naming its rows, unless it is listed in :data:`PENDING` with the reason.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# tables whose results file is not committed yet: (page, first header cells) -> why. Each is a gap to close.
PENDING: dict[tuple[str, tuple[str, ...]], str] = {}
NUMBER = re.compile(r"\d\.\d|\d ?%|\d×")  # a table with one of these in its body is a table of figures
FIGURE = re.compile(r"^([-+]?[\d,]*\.?\d+)( ?%| ?×| s| ms| MiB)?( ± [\d.]+)?$")
CODE = re.compile(r"^`([^`]+)`|\(`([^`]+)`\)")


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The Markdown tables of ``text``: (header cells, body rows)."""
    blocks, cur = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cur.append(line)
            continue
        if len(cur) >= 3:
            blocks.append(cur)
        cur = []
    out = []
    for block in blocks:
        rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
        if set("".join(rows[1])) <= set("-: "):
            out.append((rows[0], rows[2:]))
    return out


def plain(cell: str) -> str:
    return cell.replace("**", "").replace("`", "").strip()


def name(cell: str) -> str:
    """A row's name in a cell: ``teacher (`clipkd-tiny`)`` is ``teacher``; ``**`cutmix_fm`** (the method)`` and
    ``stored views: 7 views (`cutmix_views_budget`)`` are their code names; ``20,000`` is ``20000``."""
    bare = cell.replace("**", "").strip()
    code = CODE.search(bare)
    before = plain(cell).split(" (")[0].strip()
    if code and (bare.startswith("`") or " " in before):
        return code.group(1) or code.group(2)
    return before.replace(",", "") if FIGURE.match(before) else before


def column(h: str) -> str:
    return plain(h).lower().replace("_", " ")


def same(page: str, result: str) -> bool:
    """A page's figure is the result's, or the result rounded as the page writes it (``9.4`` of ``9.41``)."""
    a, b = plain(page), plain(result)
    if a == b:
        return True
    ma, mb = FIGURE.match(a), FIGURE.match(b)
    if not (ma and mb) or (ma.group(2) or "").strip() != (mb.group(2) or "").strip() or ma.group(3) != mb.group(3):
        return False
    x, y = (float(m.group(1).replace(",", "")) for m in (ma, mb))
    return abs(round(y, len(ma.group(1).partition(".")[2])) - x) < 1e-9


def key_columns(head: list[str], rows: list[list[str]]) -> list[int]:
    """A results table's key: its first column, and as many after it as make every row's key unique."""
    n = 1
    while n < len(head) and len({tuple(name(c) for c in r[:n]) for r in rows}) < len(rows):
        n += 1
    return list(range(n))


def results_tables() -> list[tuple[str, list[str], list[int], dict[tuple[str, ...], list[str]]]]:
    """Every table of the committed results files: (file, header, key columns, rows by key)."""
    out = []
    for f in sorted(RESULTS.glob("*.md")):
        for head, rows in tables(f.read_text(encoding="utf-8")):
            cols = key_columns(head, rows)
            out.append((f.name, head, cols, {tuple(name(r[i]) for i in cols): r for r in rows}))
    return out


def doc_tables() -> list[tuple[str, list[str], list[list[str]]]]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return [(str(page.relative_to(ROOT)), head, rows) for page in pages
            for head, rows in tables(page.read_text(encoding="utf-8"))
            if any(NUMBER.search(c) for r in rows for c in r[1:])]


def row_problems(head: list[str], row: list[str], found: list) -> str | None:
    """None when a results table holds ``row``, else why not: the differences in the closest table, or that none
    has the row."""
    mine = {column(h): i for i, h in enumerate(head)}
    best = None
    for file, rhead, cols, rrows in found:
        keys = [column(rhead[i]) for i in cols]
        if not all(k in mine for k in keys):
            continue
        other = rrows.get(tuple(name(row[mine[k]]) for k in keys))
        theirs = {column(h): i for i, h in enumerate(rhead)}
        shared = [h for h in mine if h in theirs and h not in keys]
        if other is None or not shared:
            continue
        wrong = [f"{h}: {plain(row[mine[h]])!r} here, {plain(other[theirs[h]])!r} in {file}" for h in shared
                 if not same(row[mine[h]], other[theirs[h]]) and name(row[mine[h]]) != name(other[theirs[h]])]
        wrong += [f"{h}: figures that no column of {file} holds" for h in mine
                  if h not in theirs and FIGURE.match(plain(row[mine[h]]))]
        if not wrong:
            return None
        best = wrong if best is None or len(wrong) < len(best) else best
    return "; ".join(best[:3]) if best else "no results table has this row"


@pytest.mark.parametrize("page,head,rows", doc_tables(), ids=lambda x: x if isinstance(x, str) else None)
def test_every_table_of_figures_is_a_copy_of_its_results_file(page, head, rows):
    if (page, tuple(head[:2])) in PENDING:
        pytest.skip(f"pending: {PENDING[page, tuple(head[:2])]}")
    found = results_tables()
    wrong = [f"{[name(c) for c in r[:2]]}: {why}" for r in rows if (why := row_problems(head, r, found)) is not None]
    assert not wrong, f"{page}: table {head[:4]}...: " + " | ".join(wrong[:5])


# Figures quoted in prose: each is computed here from its results file and must appear, so written, in its page.
def _json(name: str):
    import json

    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def _mean(runs: list[dict], k: str) -> float:
    return sum(r[k] for r in runs) / len(runs)


def _span(values: list[float], fmt: str = "{:.0f}") -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def _gzsl_shares(methods: tuple[str, ...]) -> str:
    g = _json("gzsl.json")
    return _span([100 * _mean(g[w][m], "H") / g[w]["teacher"]["H"] for w in ("digits", "digits-colour")
                  for m in methods])


def _rep(worlds: tuple[str, ...]) -> str:
    r = _json("retrieval.json")
    share = [100 * _mean(r[w]["distilled_rep"], "i2i_map@10") / r[w]["teacher"]["i2i_map@10"] for w in worlds]
    speed = [r[w]["teacher"]["cost"]["cpu_ms_per_image"] / r[w]["distilled_rep"][0]["cost"]["cpu_ms_per_image"]
             for w in worlds]
    return f"{_span(share)} % at {_span(speed, '{:.1f}')}×"


def _serve() -> str:
    s = {row["runtime"] + (" lean" if "lean" in row["server"] else ""): row for row in _json("serve.json")}
    lean, torch_ = s["onnx lean"], s["torch"]
    return (f"{lean['peak_mb']:,.0f} MiB and {lean['startup_s']:.1f} s to start against {torch_['peak_mb']:,.0f} MiB "
            f"and {torch_['startup_s']:.1f} s")


def _install() -> str:
    i = _json("install.json")
    return f"{i['.venv-lean']['mib']:,.0f} MiB on disk against {i['.venv']['mib']:,.0f} MiB"


def _demo_retrieval() -> str:
    d = _json("demo-retrieval.json")
    t = d["teacher"]["i2i_map@10"]
    clips = [100 * d["students"][n]["i2i_map@10"] / t for n in d["students"] if n != "distilled"]
    return (f"keeps {100 * d['students']['distilled']['i2i_map@10'] / t:.0f} % of the teacher's image-to-image mAP@10 "
            f"at {d['distilled_cost']['image_mflops']:.1f} against {d['teacher']['cost']['image_mflops']:.1f} MFLOPs "
            "per image "
            f"(the micro CLIPs fine-tuned on the captioned subset alone: {_span(clips)} %")


def _demo_retrieval_spread() -> str:
    """The README's run-to-run spread of `make demo`'s retrieval table: every kept run's results file."""
    runs = [json.loads(f.read_text(encoding="utf-8")) for f in sorted(RESULTS.glob("demo-retrieval*.json"))]
    assert len(runs) >= 2, "the spread needs at least two kept runs"

    def span(name: str) -> str:
        return _span([(r["teacher"] if name == "teacher" else r["students"][name])["i2i_map@10"] for r in runs],
                     "{:.3f}")

    def speed(cost: str) -> str:
        return _span([r["teacher"]["cost"]["cpu_ms_per_image"] / r[cost]["cpu_ms_per_image"] for r in runs], "{:.1f}")

    names = ["teacher", *runs[-1]["students"]]
    return (f"i2i mAP@10 spans {', '.join(f'{n} {span(n)}' for n in names)}, and the speed-ups follow the "
            f"machine's load (micro CLIPs {speed('student_cost')}×, distilled {speed('distilled_cost')}×)")


def _demo_gzsl_rerun() -> str:
    """The README's GZSL rerun: the largest move of any row's H between the table's run and the second one."""
    a, b = _json("demo.json"), _json("demo-2026-12-06.json")
    rows = {"teacher": (a["teacher"]["H"], b["teacher"]["H"])} | {n: (a["students"][n]["H"], b["students"][n]["H"])
                                                                  for n in a["students"]}
    name = max(rows, key=lambda n: abs(rows[n][0] - rows[n][1]))
    move = abs(rows[name][0] - rows[name][1])
    return (f"gave every row's H within {math.ceil(move * 1000) / 1000:.3f} of the table (the largest move: {name}, "
            f"{rows[name][1]:.3f})")


def _recipe_demo() -> str:
    r = _json("retrieval.json")["demo"]
    run = r["mse_views_extra"]
    share = 100 * _mean(run, "i2i_map@10") / r["teacher"]["i2i_map@10"]
    speed = r["teacher"]["cost"]["cpu_ms_per_image"] / run[0]["cost"]["cpu_ms_per_image"]
    return f"keeps {share:.0f} % in `make bench-retrieval`, at {speed:.1f}× the teacher's speed"


def _nopool() -> str:
    """The README's no-pool claim: the 3x schedule's share of the teacher's H on every world, and its compute."""
    shares, compute = [], []
    for name, worlds in (("gzsl-nopool.json", ("digits", "digits-colour")), ("gzsl-nopool-demo.json", ("demo",))):
        g = _json(name)
        for w in worlds:
            runs = g[w]["cutmix_fm_long"]
            shares.append(100 * _mean(runs, "H") / g[w]["teacher"]["H"])
            compute.append(runs[0]["compute_vs_embed"])
    return (f"training it three times as long from the same stored views keeps {_span(shares)} % of the teacher's H "
            f"at {_span(compute, '{:.1f}')}× `embed`'s compute")


def _pool() -> str:
    """The README's pool claim: the students trained on `source`'s selection (both methods, 2x and 10x distractors
    on the digit worlds, the demo world), as shares of the teacher's H."""
    shares = []
    for name, worlds in (("gzsl-pool.json", ("digits", "digits-colour")), ("gzsl-pool-x10.json",
                                                                           ("digits", "digits-colour")),
                         ("gzsl-pool-demo.json", ("demo",))):
        g = _json(name)
        shares += [100 * _mean(g[w][m], "H") / g[w]["teacher"]["H"] for w in worlds
                   for m in ("embed_select", "cutmix_fm_select")]
    return f"with a pool that `clipkd source` picks from a mixed collection, {_span(shares)} %"


QUOTES = [
    ("README.md", _nopool),
    ("README.md", _pool),
    ("README.md", _install),
    ("README.md", _recipe_demo),
    ("README.md", lambda: f"the GZSL method keeps {_gzsl_shares(('cutmix_fm',))} % of the teacher's H"),
    ("README.md", lambda: f"where the seed's methods keep {_gzsl_shares(('embed', 'embed_label'))} %"),
    ("README.md", lambda: f"keeps {_rep(('digits', 'digits-colour'))} the teacher's batch-1 speed"),
    ("README.md", lambda: f"keeps {_rep(('demo-zh',))} the teacher's batch-1 speed"),
    ("README.md", _serve),
    ("README.md", _demo_retrieval),
    ("README.md", _demo_retrieval_spread),
    ("README.md", _demo_gzsl_rerun),
]


@pytest.mark.parametrize("page,quote", QUOTES)
def test_figures_quoted_in_prose_are_their_results(page, quote):
    text = " ".join((ROOT / page).read_text(encoding="utf-8").replace("**", "").split())
    want = quote()
    assert want in text, f"{page} should say “{want}” (from its results file)"


def test_no_results_file_names_a_folder_of_the_machine_that_measured_it():
    """Results files move with the repository: a path in them is relative to the checkout (benchmarks/common.py's
    ``portable``, and the demo names its teacher by its run folder), never ``/work/...`` or ``/tmp/...``."""
    absolute = re.compile(r"(?<![\w.:/])/(?:work|tmp|home|root|Users|mnt|data|var)/[^\s\"'|)]+")
    found = [f"{f.name}: {m.group(0)}" for f in sorted(RESULTS.iterdir()) if f.suffix in (".json", ".md")
             for m in absolute.finditer(f.read_text(encoding="utf-8"))]
    assert not found, f"{len(found)} absolute paths, e.g. {found[:3]}"
