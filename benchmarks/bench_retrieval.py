"""Retrieval students × worlds: which student to ship for image search, and how close it gets to its teacher.

For each world (the demo world, both digit worlds; relevant = same class) a teacher CLIP trained on every captioned
image stands in for a large pretrained one, and students are measured on the test split:

The ``demo-zh`` world is the demo world with its Chinese captions: its teacher is a Chinese-CLIP (``cn_clip:
clipkd-tiny-zh``, Chinese-CLIP's word-piece tokenizer and BERT text tower, 4-layer ViT at 32 px) trained on every
Chinese caption, and its CLIP students are ``cn_clip:clipkd-micro-zh``.

- ``no_kd``: a micro CLIP (``clipkd-micro``) fine-tuned with the contrastive loss on a captioned subset,
- ``mse``: the same plus CLIP-KD's feature distillation from the teacher's store (the demo's best KD until now),
- ``mse_views_extra``: the same micro CLIP, its KD term also on the captioned images' stored views and on the whole
  uncaptioned collection (``clip-train --store VIEWS --extra-images``): clip-train's new recipe,
- ``inherit_views_extra``: ``mse_views_extra`` with the student started from slices of the teacher's own weights
  (``clip-train --inherit TEACHER``: TinyCLIP's weight inheritance; the worlds' teachers and students are one family),
- ``relation_views_extra``: ``mse_views_extra`` with relational KD instead of feature KD (``--kd-loss relation``,
  weight 50: the batch's image–image similarities as the teacher's, each model in its own space),
- ``inherit_relation_views_extra`` (only when asked for with ``--methods``): both together,
- ``text_views_extra``: ``mse_views_extra`` plus text-tower KD (``--kd-text-weight 2 --teacher T``: the student's
  caption embeddings onto the teacher's, the teacher's text tower run once over the captions),
- ``distilled_plain``: a timm ``test_resnet`` (the micro CLIP's image tower) distilled on the teacher's embeddings
  of the whole uncaptioned collection (every train image, one view each), searched with the teacher's text tower,
- ``distilled``: the same student on clipkd's method: a store of 4 views per image (flipped / CutMix / recoloured),
  embedded once by the teacher,
- ``distilled_rep``: clipkd's method from the same store into ``clipkd_rep_s``, a RepVGG-style student built for
  batch-1 latency (its branches fold into one conv per block for inference; `clipkd.students.repnets`),
- ``distilled_rep_xs`` (only when asked for with ``--methods``): the same with ``clipkd_rep_xs`` (5 convs), for twice
  the epochs (about the same training compute: 2.65 against 4.23 MFLOPs per image).

Columns: i2i mAP@10 / R@1 / P@10, t2i and i2t R@1, the share of the teacher's i2i mAP@10 and t2i R@1, the image
tower's MFLOPs and batch-1 CPU latency (and the teacher's over the student's), training compute relative to
``no_kd`` (student image passes plus the teacher passes that made the targets, FLOP-weighted), wall time.
``make bench-retrieval`` writes ``results/retrieval.md`` / ``.json`` / ``.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

from bench_gzsl import prepare
from common import portable, report, table

import clipkd
from clipkd.data.captions import subset_captions
from clipkd.teachers import resolve_model

KEYS = ("i2i_map@10", "i2i_r@1", "i2i_p@10", "t2i_r@1", "i2t_r@1")
# world -> (captioned images per class, clip-train epochs, distill epochs)
WORLDS = {"digits": (25, 30, 30), "digits-colour": (8, 30, 30), "demo": (40, 15, 5), "demo-zh": (40, 15, 5)}
CAPTIONS = {"demo-zh": "captions_zh.csv"}  # else captions_en.csv
CLIP_STUDENT = {"demo-zh": "cn_clip:clipkd-micro-zh@random"}  # else open_clip:clipkd-micro
ZH_TEACHER = clipkd.ClipTrainConfig(model="cn_clip:clipkd-tiny-zh@random", epochs=12, batch_size=128, lr=2e-3)
VIEWS_EXTRA = ("mse_views_extra", "inherit_views_extra", "relation_views_extra", "inherit_relation_views_extra",
               "text_views_extra")
CLIP_METHODS = ("no_kd", "mse", *VIEWS_EXTRA)
ALL_METHODS = (*CLIP_METHODS, "distilled_plain", "distilled", "distilled_rep", "distilled_rep_xs")
METHODS = tuple(m for m in ALL_METHODS if m not in ("inherit_relation_views_extra", "distilled_rep_xs"))
STUDENT = "test_resnet"
REP_STUDENT = "clipkd_rep_s"
# epochs chosen by a sweep by hand on the demo world (more epochs: higher i2i mAP@10; not kept in a results file)
REP_EPOCHS = {"digits": 30, "digits-colour": 30, "demo": 15, "demo-zh": 15}


def prepare_world(world: str, root: Path, device: str, demo_run: Path | None) -> dict:
    """``bench_gzsl.prepare``'s world, teacher and store; for ``demo-zh`` the demo world with a Chinese-CLIP teacher
    trained on its Chinese captions (and that teacher's store)."""
    if world != "demo-zh":
        return {**prepare(world, root, device, demo_run), "captions": "captions_en.csv"}
    w = prepare("demo", root, device, demo_run)["world"]
    base = root / world
    run = base / "teacher"
    caps = w / "train" / CAPTIONS[world]
    spec = (resolve_model(run) if (run / "run.json").is_file() else
            clipkd.clip_train(w / "train", caps, run, ZH_TEACHER, device=device, overwrite="changed").spec)
    store = clipkd.embed_images(spec, w / "train", base / "store", device=device)
    return {"world": w, "spec": spec, "store": store.root, "base": base, "captions": CAPTIONS[world]}


def views_store(p: dict, world: str, device: str, views: int) -> Path:
    """The teacher's store of ``views`` views of every train image (the retrieval demo's, when it made one)."""
    base = p.get("demo_run") or p["base"]
    return clipkd.embed_images(p["spec"], p["world"] / "train", base / f"store-views{views}", device=device,
                               views=views).root


def run_method(world: str, method: str, seed: int, p: dict, root: Path, device: str) -> dict:
    """Train (or reuse) one student and measure it; returns metrics, cost and compute."""
    w, spec = p["world"], p["spec"]
    per_class, clip_epochs, distill_epochs = WORLDS[world]
    out = root / world / f"{method}-s{seed}"
    t0 = time.perf_counter()
    trained_before = (out / "run.json").is_file()
    done = p.get("demo_retrieval") and p["demo_retrieval"] / "students" / method
    reused = done and method in ("no_kd", "mse") and seed == 0 and (done / "run.json").is_file()
    if reused:
        model, text_model = str(done), None  # the retrieval demo's own run of this recipe
        images = per_class * len(clipkd.load_classnames(w / "train"))
        compute = {"student_images": clip_epochs * images,  # mse's targets: the teacher's pass over the store
                   "teacher_images": len(clipkd.EmbeddingStore(p["store"])) if method == "mse" else 0}
    elif method in CLIP_METHODS:
        caps = subset_captions(w / "train" / p["captions"], per_class, root / world / "captions.csv")
        cfg = clipkd.ClipTrainConfig(model=CLIP_STUDENT.get(world, "open_clip:clipkd-micro"), epochs=clip_epochs,
                                     batch_size=64, lr=2e-3, inherit=spec if method.startswith("inherit") else "",
                                     kd_weight=2.0, kd_loss="mse", seed=seed)
        if "relation" in method:
            cfg = replace(cfg, kd_loss="relation", kd_weight=50.0)
        if method == "text_views_extra":
            cfg = replace(cfg, kd_text_weight=2.0)
        kw = {"store": p["store"]} if method == "mse" else {}
        if method in VIEWS_EXTRA:
            kw = {"store": views_store(p, world, device, 4), "extra_images": w / "train"}
            if method == "text_views_extra":
                kw["teacher"] = spec  # its text tower, for the captions (image targets from the store)
        r = clipkd.clip_train(w / "train", caps, out, cfg, device=device, overwrite="changed",
                              val_images=w / "val", val_captions=w / "val" / p["captions"], **kw)
        model, text_model = r.spec, None
        with caps.open(newline="", encoding="utf-8") as f:
            images = {row["path"] for row in csv.DictReader(f)}
        n = len(images) * (2 if method in VIEWS_EXTRA else 1)  # + one view per captioned image
        if method in VIEWS_EXTRA:
            n += len(clipkd.open_source(w / "train")) - len(images)
        compute = {"student_images": clip_epochs * n,
                   "teacher_images": len(clipkd.EmbeddingStore(kw["store"])) if kw else 0}
    else:
        views = 1 if method == "distilled_plain" else 4
        store = p["store"] if views == 1 else views_store(p, world, device, views)
        student, epochs = {"distilled_rep": (REP_STUDENT, REP_EPOCHS[world]),
                           "distilled_rep_xs": ("clipkd_rep_xs", 2 * REP_EPOCHS[world])}.get(method,
                                                                                         (STUDENT, distill_epochs))
        cfg = replace(clipkd.TrainConfig(student=student, epochs=epochs, batch_size=64, lr=2e-3), seed=seed)
        r = clipkd.distill(w / "train", out, cfg, store=store, device=device, overwrite="changed", progress=False)
        model, text_model = str(r.out), spec
        compute = {"student_images": epochs * r.train_images,
                   "teacher_images": len(clipkd.EmbeddingStore(store))}
    # None: trained by make demo
    train_s = None if reused else _train_seconds(out, trained_before, time.perf_counter() - t0)
    m = clipkd.evaluate_retrieval(model, w / "test", w / "test" / p["captions"], device=device,
                                  text_model=text_model, progress=False, out=out / "retrieval.json").to_dict()
    return {**{k: m[k] for k in KEYS}, "model": model, "compute": compute,
            "train_s": None if train_s is None else round(train_s, 1)}


def _train_seconds(out: Path, trained_before: bool, elapsed: float) -> float:
    """The wall time of the pass that trained ``out``: this pass's when it trained the run, else the time that pass
    recorded beside it (reusing a finished run takes about a second)."""
    record = out / "bench_train_s.json"
    if trained_before and record.is_file():
        return float(json.loads(record.read_text())["train_s"])
    record.write_text(json.dumps({"train_s": round(elapsed, 1)}))
    return elapsed


def flops_weighted(compute: dict, student_mflops: float, teacher_mflops: float) -> float:
    """Training FLOPs: 3 forwards' worth per student image pass (forward + backward), 1 per teacher pass."""
    return 3 * compute["student_images"] * student_mflops + compute["teacher_images"] * teacher_mflops


def merged(old: dict, new: dict, day: str) -> tuple[dict, set[str]]:
    """``old`` results with ``new``'s worlds and methods put in, and the worlds replaced whole. A world whose every
    row is new is replaced whole (teacher and its latency included, noted with ``day``); otherwise the new rows join
    the kept ones, which is refused when the teacher now measures differently (another teacher: the kept rows would
    not be comparable)."""
    out, replaced = {w: dict(v) for w, v in old.items()}, set()
    for world, res in new.items():
        if world in out:
            was, now = out[world]["teacher"], res["teacher"]
            retrained = any(abs(was[k] - now[k]) > 1e-9 for k in KEYS)
            if set(out[world]) <= set(res):  # every row of the world measured again: the world is replaced
                note = "every row re-measured" + (" with a retrained teacher" if retrained else "") + f" ({day})"
                out[world] = {**res, "teacher": {**now, "notes": [note]}}
                replaced.add(world)
                continue
            if retrained:
                raise SystemExit(f"--update: the {world} teacher measures {[now[k] for k in KEYS]} now, "
                                 f"{[was[k] for k in KEYS]} in the results file: rerun every method of that world")
            res = {**res, "teacher": was}
        out[world] = {**out.get(world, {}), **res}
    return out, replaced


def table_rows(raw: dict) -> list[dict]:
    """The table's rows (teacher first, then each method in the order measured) from the results' JSON."""
    rows = []
    for world, res in raw.items():
        teacher, tcost = res["teacher"], res["teacher"]["cost"]
        rows.append({"world": world, "model": "teacher", **{k: f"{teacher[k]:.3f}" for k in KEYS},
                     "share i2i": "100 %", "share t2i": "100 %", "MFLOPs": tcost["image_mflops"],
                     "ms/img": tcost["cpu_ms_per_image"], "speed-up": "1.0×",
                     "ms/img b64": tcost["cpu_ms_per_image_b64"], "speed-up b64": "1.0×"})
        base = statistics.mean(r["train_flops"] for r in res["no_kd"]) if "no_kd" in res else None
        for method, runs in res.items():
            if method == "teacher":
                continue
            cost = runs[0]["cost"]
            row = {"world": world, "model": method}
            for k in KEYS:
                vals = [r[k] for r in runs]
                row[k] = f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")
            row["share i2i"] = f"{100 * statistics.mean(r['i2i_map@10'] for r in runs) / teacher['i2i_map@10']:.0f} %"
            t2i = statistics.mean(r["t2i_r@1"] for r in runs)
            row["share t2i"] = f"{100 * t2i / max(teacher['t2i_r@1'], 1e-9):.0f} %"
            row["MFLOPs"] = cost["image_mflops"]
            row["ms/img"] = cost["cpu_ms_per_image"]
            row["speed-up"] = f"{tcost['cpu_ms_per_image'] / cost['cpu_ms_per_image']:.1f}×"
            row["ms/img b64"] = cost["cpu_ms_per_image_b64"]
            row["speed-up b64"] = f"{tcost['cpu_ms_per_image_b64'] / cost['cpu_ms_per_image_b64']:.1f}×"
            if base:
                row["compute vs no_kd"] = f"{statistics.mean(r['train_flops'] for r in runs) / base:.2f}×"
            times = [r["train_s"] for r in runs if r["train_s"] is not None]
            row["train s"] = f"{statistics.mean(times):.0f}" if times else "make demo's run"
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(ALL_METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--gzsl-root", default=".data/gzsl", help="worlds, teachers and stores (shared with bench_gzsl)")
    ap.add_argument("--root", default=".data/retrieval", help="students (reused)")
    ap.add_argument("--demo-run", type=Path, help="reuse this clipkd demo folder for the demo world (../runs/demo)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for the timings (training uses the "
                    "machine's); one by default: batch-1 latency of these small towers is steadiest, and no slower, "
                    "on one thread of a 2-core machine")
    ap.add_argument("--out", default="results/retrieval.md")
    ap.add_argument("--update", action="store_true", help="replace these worlds' and methods' rows in --out's JSON "
                    "(and its table) and keep the others; refused when a world's teacher measures differently")
    ap.add_argument("--withdraw", nargs="+", default=[], choices=list(ALL_METHODS),
                    help="with --update: drop these methods' rows from the worlds not measured now (rows that a fix "
                    "made wrong and that this run does not re-measure)")
    a = ap.parse_args()
    if a.threads < 1:
        ap.error(f"--threads must be at least 1, got {a.threads}")
    logging.basicConfig(level=logging.WARNING)
    raw = {}
    for world in a.worlds:
        p = prepare_world(world, Path(a.gzsl_root), a.device, a.demo_run)
        if world == "demo" and a.demo_run is not None:
            p["demo_run"] = a.demo_run
            p["demo_retrieval"] = a.demo_run.parent / "demo-retrieval"
        t0 = time.perf_counter()
        teacher = clipkd.evaluate_retrieval(p["spec"], p["world"] / "test", p["world"] / "test" / p["captions"],
                                            device=a.device, progress=False).to_dict()
        raw[world] = {"teacher": {**{k: teacher[k] for k in KEYS}, "eval_s": round(time.perf_counter() - t0, 1)}}
        for method in a.methods:
            raw[world][method] = [run_method(world, method, s, p, Path(a.root), a.device) for s in a.seeds]
            print(world, method, {k: raw[world][method][0][k] for k in KEYS}, flush=True)
        # the teacher and every student measured side by side, so that the speed-ups are ratios of one moment
        costs = clipkd.image_costs([p["spec"], *(raw[world][m][0]["model"] for m in a.methods)], threads=a.threads)
        raw[world]["teacher"]["cost"] = costs[0]
        for method, cost in zip(a.methods, costs[1:], strict=True):
            for r in raw[world][method]:
                r["cost"] = cost
                r["train_flops"] = flops_weighted(r["compute"], cost["image_mflops"], costs[0]["image_mflops"])
    out = Path(a.out)
    if a.update:
        before = json.loads(out.with_suffix(".json").read_text())
        day = time.strftime("%Y-%m-%d")
        raw, replaced = merged(before, raw, day)
        for world, res in raw.items():
            notes = res["teacher"].setdefault("notes", [])  # kept in the JSON: later --update runs keep them
            new = ([f"{m} withdrawn (measured before a fix, not re-measured)" for m in a.withdraw]
                   if world not in a.worlds else ["added by --update (another run than the other worlds')"]
                   if world not in before else [] if world in replaced
                   else [f"{m} re-measured by --update: its speed-ups divide the earlier run's teacher time by its own "
                         "(two runs)" for m in a.methods])
            for m in a.withdraw if world not in a.worlds else ():
                res.pop(m, None)
            notes += [f"{n} ({day})" for n in new if not any(old.startswith(n) for old in notes)]
    rows = table_rows(raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(portable(raw), indent=2))
    cols = ["world", "model", *KEYS, "share i2i", "share t2i", "MFLOPs", "ms/img", "speed-up", "ms/img b64",
            "speed-up b64", "compute vs no_kd", "train s"]
    body = table(rows, cols)
    seeds = sorted({len(runs) for res in raw.values() for m, runs in res.items() if m != "teacher"})
    body += (f"\n\nSeeds per row: {' or '.join(map(str, seeds))}, from seed 0 "
             "(mean ± standard deviation where more than one). "
             "Test split; relevant = same "
             "class. CLIP students: clipkd-micro (demo-zh: cn_clip clipkd-micro-zh, teacher cn_clip clipkd-tiny-zh "
             "trained on every Chinese caption), captioned subset per class "
             + ", ".join(f"{w} {v[0]}" for w, v in WORLDS.items()) + f", batch 64, lr 2e-3. Distilled: timm "
             f"{STUDENT}, the whole train split without captions, batch 64, lr 2e-3, text queries through the "
             "teacher's text tower; distilled_rep: " + f"{REP_STUDENT} (folded for inference), epochs "
             + ", ".join(f"{w} {e}" for w, e in REP_EPOCHS.items()) + ". ms/img: batch-1 CPU latency; b64: CPU time "
             "per image at batch 64 (throughput); a world's teacher and students measured side by side in 5 rounds "
             "(40 batch-1 and 2 batch-64 passes each a round), each model's lowest round median, on torch CPU "
             "threads " + ", ".join(f"{w} {res['teacher']['cost'].get('cpu_threads', 'not recorded')}"
                                    for w, res in raw.items())
             + (" (not recorded: an earlier run, which timed each model alone)"
                if any("cpu_threads" not in res["teacher"]["cost"] for res in raw.values()) else "") + "; "
             "speed-up: the teacher's over the student's. Compute vs no_kd: training FLOPs "
             "(3 per student image pass, 1 per teacher pass that made a target, the store's one-off pass included) "
             "over no_kd's. Distill epochs per world: " + ", ".join(f"{w} {v[2]}" for w, v in WORLDS.items())
             + "; CLIP epochs: " + ", ".join(f"{w} {v[1]}" for w, v in WORLDS.items()) + ". train s: wall time "
             "(of the pass that trained the run, recorded beside it and shown again when a later pass reuses it; "
             "noisy).\n")
    notes = [f"{w}: {n}" for w, res in raw.items() for n in res["teacher"].get("notes", [])]
    if notes:
        body += "\nRows changed since the run that made this table: " + "; ".join(notes) + ".\n"
    report("Retrieval students × worlds", body, out)
    plot(raw, out.with_suffix(".png"))


def plot(raw: dict, path: Path) -> None:
    """One panel per world: each model's i2i mAP@10 (bars) with the teacher's as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(raw), figsize=(4.2 * len(raw), 3.6), squeeze=False)
    for ax, (world, res) in zip(axes[0], raw.items(), strict=True):
        names = [n for n in res if n != "teacher"]
        vals = [statistics.mean(r["i2i_map@10"] for r in res[n]) for n in names]
        ax.bar(names, vals, color=["#999", "#79c", "#e94", "#d52", "#a31"][: len(names)])
        ax.axhline(res["teacher"]["i2i_map@10"], color="k", ls="--", lw=1, label="teacher")
        for i, v in enumerate(vals):
            ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(world)
        ax.set_ylabel("i2i mAP@10")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
