"""``clipkd demo``: the whole first workflow, offline, in clipkd's own demo world.

synthesise → train (or reuse) a small CLIP teacher → class text embeddings → image-embedding store →
four students on the seen classes only (the seed's ``embed`` and ``embed_label``, clipkd's
``cutmix_fm``, and the ``supervised`` baseline) → generalized
zero-shot evaluation of the teacher and each student → ``results.json``, ``report.md``, PNG plots.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .data.captions import subset_captions
from .data.synth import WorldConfig, synthesize
from .errors import ClipkdError
from .evaluation.plots import plot_results_bars
from .evaluation.report import markdown_table, plot_all_curves
from .evaluation.zeroshot import evaluate
from .fileio import read_json, write_json, write_text
from .models import image_costs
from .prompts import build_prompts, embed_prompts, load_classnames
from .store import embed_images
from .teachers import load_teacher
from .training.clip_train import ClipTrainConfig, clip_train
from .training.distill import TrainConfig, distill, train_supervised

log = logging.getLogger(__name__)

OWN = "changed"  # the demo's folders are its own: resume a run of the same recipe, replace one of another
METHOD = "cutmix_fm"  # the row of clipkd's GZSL method (CutMix function matching)

# Prompt templates for the demo teacher: the phrasing its captions use.
DEMO_TEMPLATES = ["a photo of a {}.", "a picture showing one {}.", "a {}."]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of a demo run; ``quick`` shrinks everything to about a minute."""

    world: WorldConfig = field(default_factory=lambda: WorldConfig(train_per_class=300))
    teacher: ClipTrainConfig = field(default_factory=lambda: ClipTrainConfig.shipped("demo-teacher"))
    student: TrainConfig = field(default_factory=lambda: TrainConfig.shipped("demo-student"))
    label_weight: float = 1.0
    baseline_epochs: int = 1  # a closed-set classifier reaches its seen-class accuracy fast; U is 0 regardless
    views: int = 3  # the method's stored views per image: what +20 % of embed's 3-epoch compute affords here


@dataclass(frozen=True)
class RetrievalDemoConfig:
    """The retrieval demo: a micro CLIP trained on a captioned subset, with and without distillation."""

    student: ClipTrainConfig = field(default_factory=lambda: ClipTrainConfig.shipped("demo-retrieval-student"))
    images_per_class: int = 40  # the fine-tuning set: a small captioned subset of the teacher's world
    # a timm student distilled with clipkd's method from a store of views over the uncaptioned collection (every
    # train image), searched with the teacher's text tower. clipkd_rep_s: a RepVGG-style student that folds into
    # seven convs for inference (about 8x the teacher's batch-1 CPU speed); 15 epochs: 98.6 % of the teacher's i2i
    # mAP@10 (5 epochs: 73 %; the micro CLIP's own test_resnet tower: 97 % in 5 epochs at 3.8x; measured 2026-12-01)
    distilled: TrainConfig = field(default_factory=lambda: replace(TrainConfig.shipped("demo-student"),
                                                                   student="clipkd_rep_s", epochs=15))
    views: int = 4


QUICK = DemoConfig(
    world=WorldConfig(n_shapes=4, n_colours=4, unseen_per_shape=1, train_per_class=24, val_per_class=4,
                      test_per_class=6),
    teacher=ClipTrainConfig(epochs=2, batch_size=32, lr=2e-3),
    student=TrainConfig(student="resnet10t", epochs=1, batch_size=32, lr=3e-3),
    baseline_epochs=1,
    views=2,
)


QUICK_RETRIEVAL = RetrievalDemoConfig(
    student=ClipTrainConfig(model="open_clip:clipkd-micro", epochs=1, batch_size=32, lr=2e-3, kd_weight=2.0),
    images_per_class=12,
    distilled=TrainConfig(student="clipkd_rep_s", epochs=1, batch_size=32, lr=3e-3),
    views=2,
)


def _step(name: str, t0: float) -> None:
    log.info("[demo %6.1fs] %s", time.perf_counter() - t0, name)


def _teacher(world: Path, out: Path, cfg: ClipTrainConfig, device: str) -> str:
    """Train the demo teacher, or reuse the one already in ``out`` when its recipe is unchanged. Either way the
    teacher is named by its run folder (which loads the weights file inside it), never by the absolute spec its
    ``run.json`` recorded: a moved or copied demo folder loads its own teacher, and results name no machine's path."""
    run = out / "run.json"
    if run.is_file() and (out / "open_clip_model.pt").is_file():
        info = read_json(run, "teacher run")
        if info.get("train") == asdict(cfg) and info.get("world") == read_json(world / "world.json")["config"]:
            log.info("reusing the trained demo teacher in %s", out)
            return str(out)
    clip_train(world / "train", world / "train" / "captions_en.csv", out, cfg, device=device, overwrite=OWN)
    info = read_json(run, "teacher run")
    info["world"] = read_json(world / "world.json")["config"]
    write_json(run, info)
    return str(out)


def _world_teacher_store(base: Path, cfg: DemoConfig, device: str, t0: float) -> tuple[Path, str, Path]:
    """The demo world, its trained teacher and the teacher's image store under ``base`` (each reused if done)."""
    world = synthesize(base / "world", cfg.world)
    _step("demo world ready", t0)
    spec = _teacher(world, base / "teacher", cfg.teacher, device)
    _step(f"teacher ready: {spec}", t0)
    embed_images(load_teacher(spec, device=device), world / "train", base / "store")
    return world, spec, base / "store"


def run_demo(out: str | Path = "runs/demo", quick: bool = False, device: str = "auto",
             cfg: DemoConfig | None = None, task: str = "zeroshot", shared: str | Path | None = None,
             retrieval: RetrievalDemoConfig | None = None) -> dict[str, Any]:
    """Run a demo into ``out`` and return (and write) its ``results.json``.

    ``task="zeroshot"``: the first workflow (students on seen classes, GZSL evaluation).
    ``task="retrieval"``: the second (CLIP fine-tuning with distillation, retrieval evaluation).
    ``shared``: a folder whose world, teacher and store are reused (e.g. the zero-shot demo's).
    """
    out = Path(out)
    cfg = cfg or (QUICK if quick else DemoConfig())
    if task == "retrieval":
        return run_retrieval_demo(out, cfg, retrieval or (QUICK_RETRIEVAL if quick else RetrievalDemoConfig()),
                                  device, shared)
    if task != "zeroshot":
        raise ClipkdError(f"unknown demo task '{task}' (choose zeroshot or retrieval)")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    world, spec, store = _world_teacher_store(Path(shared) if shared else out, cfg, device, t0)
    split = world / "split.json"
    teacher = load_teacher(spec, device=device)
    text = out / "text_embeddings.npz"
    embed_prompts(teacher, build_prompts(load_classnames(world / "train"), DEMO_TEMPLATES)).save(text)
    _step("text embeddings and image store ready", t0)

    runs = _train_students(world, out, cfg, spec, store, text, device, t0)
    evals: dict[str, dict[str, Any]] = {}
    for name, model in [("teacher", spec)] + [(n, str(p)) for n, p in runs.items()]:
        evals[name] = evaluate(model, world / "test", text=text, split=split, val=world / "val", device=device,
                               out=out / "eval" / f"{name}.json").to_dict()
    _step("evaluation done", t0)

    keys = ("top1", "top5", "per_class_top1", "S", "U", "H", "calibrated", "ausuc")
    results = {
        "teacher": {k: evals["teacher"][k] for k in keys} | {"spec": spec},
        "students": {n: {k: evals[n][k] for k in keys} for n in runs},
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                    "device": device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")},
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    write_json(out / "results.json", results)
    plot_all_curves(evals, out / "gzsl_curves.png")
    plot_results_bars(evals, out / "gzsl_bars.png")
    table = markdown_table(evals)
    write_text(out / "report.md", _report(results, table))
    log.info("\n%s\nresults: %s  report: %s  (%.0f s)", table, out / "results.json", out / "report.md",
             results["seconds"])
    return results



def _train_students(world: Path, out: Path, cfg: DemoConfig, spec: str, store: Path, text: Path, device: str,
                    t0: float) -> dict[str, Path]:
    """The zero-shot demo's students: ``embed`` and ``embed_label`` from the store, clipkd's GZSL method on stored
    views, and the supervised baseline; their run folders by name."""
    split = world / "split.json"
    students = {
        "embed": replace(cfg.student, terms={"embed": 1.0}),
        "embed_label": replace(cfg.student, terms={"embed": 1.0, "label": cfg.label_weight}),
    }
    runs: dict[str, Path] = {}
    for name, scfg in students.items():
        runs[name] = distill(world / "train", out / "students" / name, scfg, store=store, text=text, split=split,
                             device=device, overwrite=OWN).path
        _step(f"student '{name}' trained", t0)
    # clipkd's GZSL method: the same student and epochs, on stored views (the image and flipped CutMix composites,
    # half of them recoloured, each embedded once by the teacher); as many views as keep it within +20 % of embed's
    # compute on this world
    runs[METHOD] = distill(world / "train", out / "students" / METHOD, replace(cfg.student, terms={"embed": 1.0},
                           mix="cutmix", views=cfg.views), teacher=spec, text=text, split=split, device=device,
                           overwrite=OWN).path
    _step(f"student '{METHOD}' trained", t0)
    runs["supervised"] = train_supervised(world / "train", out / "students" / "supervised",
                                          replace(cfg.student, image_size=cfg.world.image_size,
                                                  epochs=cfg.baseline_epochs), split=split,
                                          device=device, overwrite=OWN).path
    _step("baseline 'supervised' trained", t0)
    return runs

def _report(results: dict[str, Any], table: str) -> str:
    c = results["config"]
    return (
        "# clipkd demo: generalized zero-shot distillation\n\n"
        f"World: {c['world']['n_colours']} colours × {c['world']['n_shapes']} shapes, "
        f"{c['world']['image_size']} px, {c['world']['train_per_class']} train images per class. Students train on "
        "the *seen* classes only; S/U are per-class mean top-1 on seen/unseen test classes predicting over all "
        "classes, H their harmonic mean; calibrated stacking chooses γ on the val split.\n\n"
        f"{table}\n"
        f"Wall time: {results['seconds']:.0f} s on {results['machine']['platform']} "
        f"({results['machine']['device']}).\n\n"
        "![seen-unseen curves](gzsl_curves.png)\n\n![GZSL bars](gzsl_bars.png)\n"
    )


RETRIEVAL_KEYS = ("i2i_map@10", "i2i_r@1", "i2i_p@10", "t2i_r@1", "i2t_r@1", "mean_recall")


def run_retrieval_demo(out: Path, cfg: DemoConfig, rcfg: RetrievalDemoConfig, device: str = "auto",
                       shared: str | Path | None = None) -> dict[str, Any]:
    """The second workflow: fine-tune a micro CLIP on a captioned subset without and with each
    distillation loss from the demo teacher; compare image→image and text→image retrieval on test."""
    from .evaluation.retrieval import evaluate_retrieval

    t0 = time.perf_counter()
    torch.manual_seed(0)
    world, spec, store = _world_teacher_store(Path(shared) if shared else out, cfg, device, t0)
    captions = subset_captions(world / "train" / "captions_en.csv", rcfg.images_per_class,
                                out / "finetune_captions.csv")
    val = {"val_images": world / "val", "val_captions": world / "val" / "captions_en.csv"}
    runs = {"no_kd": {}, "cosine": {"store": store}, "mse": {"store": store},
            "affinity": {"store": store, "teacher": spec}}
    specs = {"teacher": spec}
    for name, kw in runs.items():
        scfg = replace(rcfg.student, kd_loss=name if name != "no_kd" else rcfg.student.kd_loss)
        specs[name] = clip_train(world / "train", captions, out / "students" / name, scfg, device=device,
                                 overwrite=OWN, **kw, **val).spec
        _step(f"retrieval student '{name}' trained", t0)
    # clipkd's method for search: the teacher embeds views of the uncaptioned collection once; a timm student
    # learns them (no captions, no labels) and searches with the teacher's text tower
    views = embed_images(spec, world / "train", (Path(shared) if shared else out) / f"store-views{rcfg.views}",
                         device=device, views=rcfg.views)
    distilled = distill(world / "train", out / "students" / "distilled", rcfg.distilled, store=views.root,
                        device=device, overwrite=OWN)
    specs["distilled"] = str(distilled.out)
    runs["distilled"] = {}
    _step("distilled search student trained", t0)
    evals = {}
    for name, model in specs.items():
        evals[name] = evaluate_retrieval(model, world / "test", world / "test" / "captions_en.csv", device=device,
                                         out=out / "eval" / f"{name}.json",
                                         text_model=spec if name == "distilled" else None).to_dict()
    _step("retrieval evaluation done", t0)
    pick = lambda r: {k: r[k] for k in RETRIEVAL_KEYS}  # noqa: E731
    costs = image_costs([spec, specs["no_kd"], specs["distilled"]])  # side by side: their ratios are the speed-ups
    results = {
        "teacher": pick(evals["teacher"]) | {"spec": spec, "cost": costs[0]},
        "students": {n: pick(evals[n]) for n in runs},
        "student_cost": costs[1],
        "distilled_cost": costs[2],
        # student image passes in training (epochs × images); the distilled student's targets: one teacher pass
        # per stored view, made once for any number of students
        "compute": {"clip_students": {"student_images": rcfg.student.epochs * len(_caption_paths(captions))},
                    "distilled": {"student_images": rcfg.distilled.epochs * distilled.train_images,
                                  "teacher_images": len(views)}},
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads()},
        "config": json.loads(json.dumps({"retrieval": asdict(rcfg), "world": asdict(cfg.world)}, default=str)),
    }
    best = max(runs, key=lambda n: evals[n]["i2i_map@10"])
    results["index"] = _search_index(specs[best], best, world / "test", out / "index", device,
                                     text_model=spec if best == "distilled" else None)
    _write_retrieval_report(out, results, evals, list(runs), best)
    log.info("search the demo world with the best retrieval student ('%s'):\n  clipkd serve --index %s\n"
             "then open http://127.0.0.1:8000 (drop an image or type e.g. 'a photo of a red circle.')", best,
             out / "index")
    return results



def _write_retrieval_report(out: Path, results: dict[str, Any], evals: dict[str, Any], students: list[str],
                            best: str) -> None:
    """``results.json``, the bar chart and ``report.md`` of the retrieval demo."""
    write_json(out / "results.json", results)
    table = retrieval_table(results)
    plot_results_bars({"teacher": evals["teacher"], **{n: evals[n] for n in students}}, out / "retrieval_bars.png",
                      keys=("i2i_map@10", "i2i_r@1", "t2i_r@1"), title="Retrieval (demo world test split)",
                      ylabel="fraction")
    write_text(out / "report.md", "# clipkd demo: retrieval students\n\n" + table +
               f"\n![bars](retrieval_bars.png)\n\n![teacher](eval/teacher.png)\n\n![best student](eval/{best}.png)\n"
               "\nCosts: the image tower's FLOPs and CPU time per image at batch 1 on this machine (a "
               "reparameterizable student folded for inference); speed-up = the teacher's time over the model's.\n")
    log.info("\n%s\nresults: %s  (%.0f s)", table, out / "results.json", results["seconds"])

def _caption_paths(captions: Path) -> set[str]:
    import csv

    with captions.open(newline="", encoding="utf-8") as f:
        return {row["path"] for row in csv.DictReader(f)}


def _search_index(spec: str, name: str, images: Path, out: Path, device: str,
                  text_model: str | None = None) -> dict[str, Any]:
    """The demo's last step: a search index of ``images`` embedded by the best retrieval student (a distilled
    student searches text with its teacher's text tower)."""
    from .models import load_image_model
    from .search.writers import build_index

    if (out / "index.json").is_file() and read_json(out / "index.json", "index").get("identity") != \
            load_image_model(spec, device="cpu").identity:
        import shutil

        shutil.rmtree(out)  # the demo's own folder: another (or a retrained) best student replaces the old index
    index = build_index(spec, images, out, device=device, progress=False, text_model=text_model)
    return {"path": str(out), "student": name, "images": len(index), "kind": index.info["kind"]}


def retrieval_table(results: dict[str, Any]) -> str:
    """Markdown: teacher and students on image→image and text↔image retrieval."""
    head = ("| model | i2i mAP@10 | i2i R@1 | i2i P@10 | t2i R@1 | i2t R@1 | mean recall | image MFLOPs | "
            "ms/image (batch 1) | speed-up |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = [("teacher", results["teacher"])] + list(results["students"].items())
    teacher_ms = results["teacher"]["cost"]["cpu_ms_per_image"]

    def cost(name: str) -> str:
        c = results["teacher"]["cost"] if name == "teacher" else \
            results["distilled_cost" if name == "distilled" else "student_cost"]
        return f" {c['image_mflops']:g} | {c['cpu_ms_per_image']:.3f} | {teacher_ms / c['cpu_ms_per_image']:.1f}× |"

    return head + "\n".join(f"| {n} | " + " | ".join(f"{r[k]:.3f}" for k in RETRIEVAL_KEYS) + " |" + cost(n)
                             for n, r in rows) + "\n"
