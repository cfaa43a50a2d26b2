"""A pool made from nothing (clipkd.data.procedural): reproducible, resumable, refuses what it cannot do, crops
only the seen classes' images, and trains with distill --extra-images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clipkd.cli import main
from clipkd.data.procedural import _seen_images, make_pool
from clipkd.errors import ClipkdError


def test_a_procedural_pool_is_reproducible_resumable_and_checked(tiny_world, tmp_path):
    w = tiny_world
    a = make_pool(tmp_path / "a", 9, 24, seed=3, mix_from=w / "train", split=w / "split.json", progress=False)
    files = sorted(p.name for p in a.glob("*.png"))
    assert len(files) == 9 and {f.split("-")[0] for f in files} == {"strokes", "leaves", "mosaic"}
    b = make_pool(tmp_path / "b", 9, 24, seed=3, mix_from=w / "train", split=w / "split.json", progress=False)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # a function of (seed, kind, index)
    images = [np.asarray(Image.open(a / f)) for f in files]
    assert all(im.shape == (24, 24, 3) and im.std() > 1 for im in images)  # not blank
    assert len({im.tobytes() for im in images}) == 9
    (a / files[4]).unlink()  # a run killed before this image: the rerun writes the same one
    make_pool(a, 9, 24, seed=3, mix_from=w / "train", split=w / "split.json", progress=False)
    assert (a / files[4]).read_bytes() == (b / files[4]).read_bytes()
    other = make_pool(tmp_path / "c", 9, 24, seed=4, kinds=["strokes"], progress=False)
    assert not any((other / f).is_file() and (other / f).read_bytes() == (a / f).read_bytes() for f in files)
    with pytest.raises(ClipkdError, match="other settings"):
        make_pool(a, 9, 24, seed=4, mix_from=w / "train", split=w / "split.json", progress=False)
    with pytest.raises(ClipkdError, match="mix_from"):
        make_pool(tmp_path / "d", 9, 24, kinds=["mosaic"], progress=False)
    with pytest.raises(ClipkdError, match="unknown procedural kind"):
        make_pool(tmp_path / "d", 9, 24, kinds=["fractal"], progress=False)
    with pytest.raises(ClipkdError, match="not empty"):
        make_pool(w / "train", 9, 24, kinds=["strokes"], progress=False)
    assert {p.name.split("-")[0] for p in make_pool(tmp_path / "e", 4, 16, progress=False).glob("*.png")} == {
        "strokes", "leaves"}  # without mix_from: no mosaics


def test_mosaics_crop_only_the_seen_classes(tiny_world):
    split = json.loads((tiny_world / "split.json").read_text())
    unseen = set(split["unseen"])
    seen = _seen_images(tiny_world / "train", tiny_world / "split.json")
    assert seen and all(p.parent.name.replace("_", " ") not in unseen for p in seen)
    everything = _seen_images(tiny_world / "train", None)
    assert len(everything) > len(seen)


def test_cli_procedural_pool_then_distill_on_it(tiny_world, teacher_spec, tmp_path, capsys):
    w, pool = tiny_world, tmp_path / "pool"
    assert main(["-q", "procedural-pool", "--out", str(pool), "--images", "12", "--size", "24", "--mix-from",
                 str(w / "train"), "--split", str(w / "split.json")]) == 0
    assert f"--extra-images {pool}" in capsys.readouterr().out and len(list(pool.glob("*.png"))) == 12
    assert main(["-q", "distill", "--images", str(w / "train"), "--teacher", teacher_spec, "--split",
                 str(w / "split.json"), "--extra-images", str(pool), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--batch-size", "16", "--student", "resnet10t", "--device", "cpu"]) == 0
    info = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert "extra_images" in json.dumps(info)
    assert main(["procedural-pool", "--out", str(pool), "--images", "12", "--size", "32"]) == 2
