"""The measurements behind two defaults: the cosine at which ``select`` / ``source`` call an image a near-copy, and
the prompt templates that ``embed-text``, ``eval`` and ``source`` use when given class names.

Near-copies: for each world's teacher store (every train image, one embedding each), every image's highest cosine to
another *distinct* image of its own class, against the cosine of the image to a true near-copy of itself (the same
picture re-encoded as JPEG at quality 75, and resized by 10 %). A threshold drops a distinct image when its
nearest neighbour lies above it; it should drop every true copy and (almost) no distinct image.

Templates: zero-shot top-1 on the test split (every class) of each world's teacher with open_clip's ``openai``
templates, the ``simple`` ones, and the templates the world was captioned with.

    python bench_defaults.py --out results/defaults.md

Reuses the worlds and teachers of ``bench_gzsl.py`` / ``bench_retrieval.py`` (``.data/gzsl``: run one first); the
stores it embeds are its own (``store-defaults``).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import numpy as np
from bench_gzsl import _teacher_spec
from common import portable, report, table
from PIL import Image

import clipkd

THRESHOLDS = (0.95, 0.98, 0.99, 0.995, 0.999)


def near_copies(p: dict, device: str, copies: int = 200) -> dict:
    """Each train image's top cosine to a distinct image of its class, and to its own re-encoded / resized copy."""
    store = clipkd.EmbeddingStore(p["store"])
    emb = np.asarray(store.embeddings(), np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([k.split("/", 1)[0] for k in store.paths])
    top = np.empty(len(emb), np.float32)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        sim = emb[idx] @ emb[idx].T
        np.fill_diagonal(sim, -1)
        top[idx] = sim.max(1)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(emb), min(copies, len(emb)), replace=False)
    teacher = clipkd.load_teacher(p["spec"], device=device)
    import torch

    root = Path(store.manifest.get("root", p["world"] / "train"))
    sims = {"jpeg q75": [], "resized 90 %": []}
    for i in pick:
        img = Image.open(root / store.paths[i]).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=75)
        variants = {"jpeg q75": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
                    "resized 90 %": img.resize((max(1, int(img.width * 0.9)), max(1, int(img.height * 0.9))))}
        for name, v in variants.items():
            with torch.no_grad():
                e = teacher.encode_image(teacher.preprocess(v)[None]).float().cpu().numpy()[0]
            sims[name].append(float(e @ emb[i] / np.linalg.norm(e)))
    return {"images": len(emb), "distinct_top": top.tolist(), "copies": sims}


def template_accuracy(p: dict, device: str) -> dict:
    world = p["world"]
    out = {}
    own = p["templates"]
    for name, templates in (("openai", "openai"), ("simple", "simple"), ("the world's captions", own)):
        if not isinstance(templates, str):
            f = Path(p["base"]) / "own-templates.txt"
            f.write_text("\n".join(templates) + "\n")
            templates = str(f)
        r = clipkd.evaluate(p["spec"], world / "test", templates=templates, device=device, progress=False)
        out[name] = r.top1
    return out


def prepare(world: str, root: Path, device: str) -> dict:
    """A world that ``bench_gzsl.prepare`` made, its teacher and the templates it was captioned with; the teacher's
    store of its train images (one embedding each) made here."""
    from clipkd.data.digits import TEMPLATES
    from clipkd.demo import DEMO_TEMPLATES

    base = root / world
    if not (base / "teacher" / "run.json").is_file():
        raise SystemExit(f"{base / 'teacher'}: run bench_gzsl.py or bench_retrieval.py for {world} first")
    spec = _teacher_spec(base / "teacher")
    w = base / "world"
    store = clipkd.embed_images(spec, w / "train", base / "store-defaults", device=device, progress=False)
    return {"world": w, "spec": spec, "store": store.root, "base": base,
            "templates": list(DEMO_TEMPLATES if world == "demo" else TEMPLATES)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", nargs="+", default=["digits", "digits-colour", "demo"])
    ap.add_argument("--gzsl-root", default=".data/gzsl")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="results/defaults.md")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    raw = {}
    for world in a.worlds:
        p = prepare(world, Path(a.gzsl_root), a.device)
        raw[world] = {"near_copies": near_copies(p, a.device), "templates_top1": template_accuracy(p, a.device)}
        print(world, raw[world]["templates_top1"], flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(portable(raw), indent=2))
    rows = []
    for world, r in raw.items():
        top = np.asarray(r["near_copies"]["distinct_top"])
        row = {"world": world, "images": r["near_copies"]["images"]}
        for t in THRESHOLDS:
            row[f"distinct ≥ {t}"] = f"{100 * np.mean(top >= t):.1f} %"
        copies = np.concatenate([np.asarray(v) for v in r["near_copies"]["copies"].values()])
        for t in THRESHOLDS:
            row[f"copies ≥ {t}"] = f"{100 * np.mean(copies >= t):.1f} %"
        rows.append(row)
    body = table(rows, list(rows[0]))
    body += ("\n\nShare of each world's distinct train images whose nearest other image of the same class lies at or "
             "above the cosine (what a near-copy threshold there would drop), and the share of 400 true copies (200 "
             "images re-encoded as JPEG q75 or resized by 10 %) at or above it against their original (what it "
             "should catch).\n\n")
    trows = [{"world": w, **{k: f"{v:.3f}" for k, v in r["templates_top1"].items()}} for w, r in raw.items()]
    body += "Zero-shot top-1 of the teacher on the test split (every class), by templates:\n\n"
    body += table(trows, list(trows[0]))
    report("The measurements behind the defaults", body, out)


if __name__ == "__main__":
    main()
