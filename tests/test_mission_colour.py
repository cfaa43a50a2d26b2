"""The mission's effect on the colour-digit world: recoloured views name colour-digit pairs the student never saw.

Its own file so that `make test`'s workers can run it beside `test_mission.py` (each worker takes a file at a time).
"""

from __future__ import annotations

from dataclasses import replace

import clipkd


def test_recoloured_views_name_unseen_colour_digit_pairs(tmp_path_factory):
    """The colour world (every colour and digit seen, one colour per digit held out): the default's recoloured
    views show the student ink colours on digits it never saw them on, with the teacher's answer, and lift U over
    the same views without recolouring."""
    from clipkd.data.digits import TEMPLATES, DigitsConfig, make_digits_world

    root = tmp_path_factory.mktemp("digits-colour")
    w = make_digits_world(root / "world", DigitsConfig(kind="digits-colour", image_size=32))
    spec = clipkd.clip_train(w / "train", w / "train" / "captions_en.csv", root / "teacher",
                             clipkd.ClipTrainConfig(epochs=12, batch_size=64, lr=2e-3, workers=0), device="cpu",
                             progress=False).spec
    teacher = clipkd.load_teacher(spec, device="cpu")
    clipkd.embed_prompts(teacher, clipkd.build_prompts(clipkd.load_classnames(w / "train"), TEMPLATES)).save(
        root / "text.npz")
    cfg = clipkd.TrainConfig(student="resnet10t", epochs=6, batch_size=64, lr=2e-3, workers=0)
    kw = {"text": root / "text.npz", "split": w / "split.json", "device": "cpu", "progress": False}
    ev = {}
    for name, hue in (("plain", 0.0), ("recoloured", "auto")):
        r = clipkd.distill(w / "train", root / name, replace(cfg, view_hue=hue), teacher=spec, **kw)
        ev[name] = clipkd.evaluate(str(r.path), w / "test", workers=0, **kw)
    # measured on three runs (CPU training is not bit-reproducible run to run): U 0.671 / 0.645 / 0.735 without
    # recolouring, 0.795 / 0.787 / 0.780 with it; H 0.778 / 0.756 / 0.815 against 0.856 / 0.825 / 0.841; S 0.926 /
    # 0.914 / 0.914 against 0.926 / 0.868 / 0.913 (the third, 2026-12-07, a lucky plain run: margins set below it)
    assert ev["recoloured"].U > ev["plain"].U + 0.02, ev
    assert ev["recoloured"].H > ev["plain"].H + 0.01, ev
    assert ev["recoloured"].S >= ev["plain"].S - 0.08, ev  # at 6 epochs S moves by a few points either way
