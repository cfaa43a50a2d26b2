"""Multi-view stores: views drawn once with their parameters, composed exactly, embedded once, sampled per epoch."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from clipkd.data.views import ViewPlan, ViewSampler, make_view_plan
from clipkd.errors import ClipkdError
from clipkd.store import EmbeddingStore, embed_views


def _solid(path, colour, size=(10, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)


def test_plan_is_seeded_and_well_formed():
    images = [f"c/{i}.png" for i in range(50)]
    a, b = make_view_plan(images, 5, seed=3), make_view_plan(images, 5, seed=3)
    assert a == b and a != make_view_plan(images, 5, seed=4)
    assert a.keys()[:2] == ["c/0.png#view=0", "c/0.png#view=1"] and len(a.keys()) == 250
    p = np.array(a.partner)
    assert (p[:, 0] == -1).all() and not np.array(a.flips)[:, 0].any()  # view 0: the image itself
    assert (p[:, 1:] >= 0).all() and (p[:, 1:] != np.arange(50)[:, None]).all()  # mixed, never with itself
    box = np.array(a.box)[:, 1:]
    assert (box >= 0).all() and (box <= 1).all() and (box[..., 0] <= box[..., 1]).all()
    half = np.array(make_view_plan(images, 5, prob=0.5, seed=0).partner)[:, 1:]
    assert 0.3 < (half >= 0).mean() < 0.7
    with pytest.raises(ClipkdError, match="`views`"):
        make_view_plan(images, 0)


def test_cutmix_and_mixup_views_are_composed_from_their_parameters(tmp_path):
    _solid(tmp_path / "a.png", (200, 0, 0))
    _solid(tmp_path / "b.png", (0, 0, 100), size=(20, 16))  # another size: resized to a's
    plan = make_view_plan(["a.png", "b.png"], 2, seed=0)
    plan.partner[0][1], plan.flips[0][1] = 1, [False, False]
    plan.box[0][1] = [0.25, 0.75, 0.5, 1.0]  # rows 2..6, columns 5..10 of a 10×8 image
    view = np.asarray(plan.compose(tmp_path, "a.png#view=1"))
    assert view.shape == (8, 10, 3)
    assert (view[2:6, 5:10] == (0, 0, 100)).all()
    inside = np.zeros((8, 10), bool)
    inside[2:6, 5:10] = True
    assert (view[~inside] == (200, 0, 0)).all()
    assert (np.asarray(plan.compose(tmp_path, "a.png#view=0")) == (200, 0, 0)).all()
    mixup = make_view_plan(["a.png", "b.png"], 2, mix="mixup", seed=0)
    mixup.partner[0][1], mixup.lam[0][1] = 1, 0.25
    px = np.asarray(mixup.compose(tmp_path, "a.png#view=1"))[0, 0]
    assert np.allclose(px, 0.25 * np.array([200, 0, 0]) + 0.75 * np.array([0, 0, 100]), atol=1)


def test_flip_mirrors_the_image(tmp_path):
    arr = np.zeros((4, 6, 3), np.uint8)
    arr[:, 0] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    _solid(tmp_path / "b.png", (0, 0, 0))
    plan = make_view_plan(["a.png", "b.png"], 2, mix="none", seed=0)
    plan.flips[0][1] = [True, False]
    view = np.asarray(plan.compose(tmp_path, "a.png#view=1"))
    assert (view[:, -1] == 255).all() and (view[:, 0] == 0).all()


def test_hue_views_rotate_colours_and_leave_the_rest_of_the_plan_as_it_was(tmp_path):
    images = [f"c/{i}.png" for i in range(40)]
    plain, hued = make_view_plan(images, 4, seed=2), make_view_plan(images, 4, seed=2, hue_prob=0.5)
    assert (plain.partner, plain.flips, plain.box) == (hued.partner, hued.flips, hued.box)  # hue drawn last
    h = np.array(hued.hue)
    assert (h[:, 0] == 0).all() and (np.abs(h) <= 0.5).all() and 0.3 < (h[:, 1:] != 0).mean() < 0.7
    assert plain.hue == [] and plain.settings() != hued.settings()
    _solid(tmp_path / "a.png", (220, 30, 30))  # red
    _solid(tmp_path / "b.png", (0, 0, 100))
    plan = make_view_plan(["a.png", "b.png"], 2, mix="none", seed=0, hue_prob=1.0)
    plan.flips[0][1], plan.hue[0][1] = [False, False], 1 / 3  # a third of a turn: red -> green
    r, g, b = np.asarray(plan.compose(tmp_path, "a.png#view=1"))[0, 0].astype(int)
    assert g > 200 and r < 60 and b < 60
    assert (np.asarray(plan.compose(tmp_path, "a.png#view=0")) == (220, 30, 30)).all()
    with pytest.raises(ClipkdError, match="`view_hue`"):
        make_view_plan(images, 3, hue_prob=1.5)


def test_sampler_draws_one_view_per_image_per_epoch():
    groups = [[0, 1, 2], [3, 4, 5], [6], [7, 8, 9]]
    s = ViewSampler(groups, seed=1)
    s.set_epoch(0)
    first = list(s)
    assert len(first) == 4 and sorted(i // 3 if i < 6 else (2 if i == 6 else 3) for i in first) == [0, 1, 2, 3]
    s.set_epoch(0)
    assert list(s) == first  # a resumed run draws what an uninterrupted one would have
    draws = set()
    for e in range(30):
        s.set_epoch(e)
        draws.update(list(s))
    assert draws == set(range(10))  # every view is used


def test_embed_views_stores_every_view_once_and_resumes(tmp_path, fake_teacher):
    for i in range(6):
        _solid(tmp_path / "img" / f"{i}.png", (40 * i, 10, 200 - 30 * i))
    images = [f"{i}.png" for i in range(6)]
    plan = make_view_plan(images, 3, seed=0)
    st = embed_views(fake_teacher, tmp_path / "img", plan, tmp_path / "views", progress=False, max_images=10)
    assert len(st) == 10
    st = embed_views(fake_teacher, tmp_path / "img", plan, tmp_path / "views", progress=False)
    assert len(st) == 18 and fake_teacher.calls == 18  # resumed: no view embedded twice
    assert ViewPlan.load(tmp_path / "views" / "views.json") == plan
    # a view's row is the teacher's embedding of the composed picture
    key = plan.key(2, 1)
    want = fake_teacher.encode_image(fake_teacher.preprocess(plan.compose(tmp_path / "img", key))[None])[0]
    row = EmbeddingStore(tmp_path / "views").targets([key]).targets[0].float()
    assert np.allclose(row.numpy(), want.numpy(), atol=2e-3)
    with pytest.raises(ClipkdError, match="another plan"):
        embed_views(fake_teacher, tmp_path / "img", make_view_plan(images, 4, seed=0), tmp_path / "views",
                    progress=False)


def test_distill_from_views_trains_on_stored_views(tiny_world, fake_teacher, tmp_path, monkeypatch):
    """--views: every view embedded once (N×K teacher forwards), then epochs over one view per image."""
    import clipkd
    import clipkd.teachers
    import clipkd.teachers.factory

    monkeypatch.setattr(clipkd.teachers.factory, "check_teacher_spec", lambda spec: None)
    monkeypatch.setattr(clipkd.teachers, "load_teacher", lambda spec, **kw: fake_teacher)
    cfg = clipkd.TrainConfig(student="resnet10t", epochs=2, batch_size=8, workers=0, views=3, image_size=16)
    r = clipkd.distill(tiny_world / "train", tmp_path / "run", cfg, teacher="fake", split=tiny_world / "split.json",
                       device="cpu", progress=False)
    run = json.loads((r.out / "run.json").read_text())
    n = r.train_images
    assert run["targets"] == "views" and run["train"]["mix"] == "cutmix"
    assert run["teacher_images"] == 3 * n == fake_teacher.calls == len(EmbeddingStore(r.out / "views"))
    plan = ViewPlan.load(r.out / "views" / "views.json")  # by default half the mixed views are recoloured
    assert run["train"]["view_hue"] == plan.hue_prob == 0.5 and any(h for row in plan.hue for h in row[1:])
    import torch

    ckpt = torch.load(r.out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 * (n // 8)  # an epoch is one view of each image, not all n×K views
    for bad, match in ((dict(views=-1), "`views` must be"), (dict(views=2, augment="crop"), "draws flips"),
                       (dict(views=0, view_hue=0.5), "needs `views`"), (dict(view_hue=2.0), "`view_hue` must")):
        from dataclasses import replace

        with pytest.raises(ClipkdError, match=match):
            clipkd.distill(tiny_world / "train", tmp_path / "bad", replace(cfg, **bad), teacher="fake",
                           device="cpu", progress=False)
    # a run's own views folder is a store of views like any other: another student trains from it, teacher-free
    again = clipkd.distill(tiny_world / "train", tmp_path / "again", replace(cfg, views="auto", epochs=1),
                           store=r.out / "views", split=tiny_world / "split.json", device="cpu", progress=False)
    assert json.loads((again.out / "run.json").read_text())["teacher_images"] == 0
    assert fake_teacher.calls == 3 * n


def test_one_store_of_views_feeds_two_students(tiny_world, fake_teacher, tmp_path, monkeypatch, capsys):
    """embed-images --views K --split: the teacher embeds K views of each seen image once; two students of other
    architectures train from that store with no teacher, on clipkd's method."""
    import clipkd
    import clipkd.teachers
    from clipkd.cli import main

    monkeypatch.setattr(clipkd.teachers, "load_teacher", lambda spec, *a, **kw: fake_teacher)
    split = tiny_world / "split.json"
    assert main(["embed-images", "--teacher", "fake:t@v1", "--images", str(tiny_world / "train"), "--out",
                 str(tmp_path / "views"), "--views", "3", "--split", str(split), "--workers", "0"]) == 0
    assert "(3 views of each image)" in capsys.readouterr().out
    plan = ViewPlan.load(tmp_path / "views" / "views.json")
    seen = set(clipkd.load_split(split).seen)
    from clipkd.data.folders import clean_classname

    assert plan.images and all(clean_classname(p.split("/")[0]) in seen for p in plan.images)
    assert plan.views == 3 and plan.hue_prob == 0.5 and fake_teacher.calls == 3 * len(plan.images)
    calls = fake_teacher.calls
    runs = {}
    for arch in ("resnet10t", "clipkd_rep_xs"):  # a plain CNN and one that folds for inference
        cfg = clipkd.TrainConfig(student=arch, epochs=1, batch_size=8, workers=0, image_size=16)
        r = clipkd.distill(tiny_world / "train", tmp_path / arch, cfg, store=tmp_path / "views", split=split,
                           device="cpu", progress=False)
        runs[arch] = json.loads((r.out / "run.json").read_text())
    for run in runs.values():
        assert run["targets"] == "views" and run["teacher_images"] == 0 and run["views"] == 3 * len(plan.images)
        assert run["train"]["views"] == 3 and run["train"]["view_hue"] == 0.5 and run["train"]["mix"] == "cutmix"
    assert fake_teacher.calls == calls  # the students paid nothing for the teacher
    from dataclasses import replace

    cfg = clipkd.TrainConfig(student="resnet10t", epochs=1, batch_size=8, workers=0, image_size=16)
    for bad, kw, match in ((dict(views=2), {}, "holds 3 for views"), ({}, {"teacher": "fake"}, "drop `teacher`"),
                           (dict(view_hue=0.0), {}, "holds 0.5 for view_hue")):
        with pytest.raises(ClipkdError, match=match):
            clipkd.distill(tiny_world / "train", tmp_path / "bad", replace(cfg, **bad), store=tmp_path / "views",
                           split=split, device="cpu", progress=False, **kw)
    with pytest.raises(ClipkdError, match="a `split` limits the images that get views"):
        clipkd.embed_images(fake_teacher, tiny_world / "train", tmp_path / "x", split=split)
    with pytest.raises(ClipkdError, match="`view_hue` recolours views"):
        clipkd.embed_images(fake_teacher, tiny_world / "train", tmp_path / "x", view_hue=0.5)
    # the same names in another folder (other pictures): refused, not trained on the old targets
    import shutil

    shutil.copytree(tiny_world / "train", tmp_path / "other")
    changed = sorted(plan.images)[0]
    _solid(tmp_path / "other" / changed, (1, 2, 3), size=(40, 40))
    with pytest.raises(ClipkdError, match="are not the files the store of views"):
        clipkd.distill(tmp_path / "other", tmp_path / "moved", cfg, store=tmp_path / "views", split=split,
                       device="cpu", progress=False)
    with pytest.raises(ClipkdError, match="are not the files the store of views"):  # nor resumed over them
        clipkd.embed_images(fake_teacher, tmp_path / "other", tmp_path / "views", views=3, split=split, workers=0)
    # same names, same byte sizes, other content (sizes cannot tell them apart): the fingerprint does
    shutil.copytree(tiny_world / "train", tmp_path / "same-size")
    data = bytearray((tmp_path / "same-size" / changed).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "same-size" / changed).write_bytes(bytes(data))
    for call in (lambda: clipkd.distill(tmp_path / "same-size", tmp_path / "moved2", cfg, store=tmp_path / "views",
                                        split=split, device="cpu", progress=False),
                 lambda: clipkd.embed_images(fake_teacher, tmp_path / "same-size", tmp_path / "views", views=3,
                                             split=split, workers=0)):
        with pytest.raises(ClipkdError, match="same size, other content"):
            call()


def test_a_view_never_shows_an_image_the_student_must_not_see(tiny_world, fake_teacher, tmp_path):
    """A store of views over every class (no split at embedding time) feeds a run on the seen classes: views whose
    CutMix partner is of an unseen class are left out, the rest kept."""
    import clipkd
    from clipkd.data.datasets import seen_images
    from clipkd.training.distill import store_views, view_set

    clipkd.embed_images(fake_teacher, tiny_world / "train", tmp_path / "views", views=4, workers=0, progress=False)
    plan = store_views(tmp_path / "views")
    data, seen = seen_images(tiny_world / "train", tiny_world / "split.json")
    assert len(data.paths) < len(plan.images)  # the store holds unseen-class images too
    vs = view_set(plan, EmbeddingStore(tmp_path / "views"), list(data.paths), list(data.labels), fake_teacher.identity,
                  len(data.classnames))
    allowed, pos = set(data.paths), {p: i for i, p in enumerate(plan.images)}
    for key in vs.keys:
        image, _, k = key.rpartition("#view=")
        assert image in allowed
        j = plan.partner[pos[image]][int(k)]
        assert j < 0 or plan.images[j] in allowed, key
    assert len(data.paths) <= len(vs.keys) < 4 * len(data.paths)  # every image itself; mixed views with unseen left out
    assert all(len(g) >= 1 for g in vs.groups)


def test_label_term_with_views_trains_on_the_views_that_keep_their_class(tiny_world, fake_teacher, tmp_path,
                                                                         monkeypatch):
    """Mixed and recoloured views are of no class the label names: only plain (or merely flipped) views are labelled."""
    from dataclasses import replace

    import torch

    import clipkd
    import clipkd.teachers
    import clipkd.teachers.factory
    from clipkd.training import modules

    monkeypatch.setattr(clipkd.teachers.factory, "check_teacher_spec", lambda spec: None)
    monkeypatch.setattr(clipkd.teachers, "load_teacher", lambda spec, **kw: fake_teacher)
    text = clipkd.embed_prompts(fake_teacher, {c: [c] for c in clipkd.load_classnames(tiny_world / "train")})
    text.save(tmp_path / "text.npz")
    seen_labels, wrong, labelled_keys = [], [], []
    real = modules.StudentModule.training_step

    def spy(self, batch, idx):
        seen_labels.append(self.label_map[batch["label"]].clone())
        ds = self.trainer.train_dataloader.dataset
        for i, y in zip(batch["index"].tolist(), batch["label"].tolist(), strict=True):
            if self.label_map[y] >= 0:
                labelled_keys.append(ds.paths[i])
                if not ds.paths[i].startswith(folders[y] + "/"):
                    wrong.append((ds.paths[i], folders[y]))  # a labelled view must be of its label's class
        return real(self, batch, idx)

    from clipkd.data.folders import scan_image_folder

    folders = scan_image_folder(tiny_world / "train").folders

    monkeypatch.setattr(modules.StudentModule, "training_step", spy)
    cfg = clipkd.TrainConfig(student="resnet10t", epochs=3, batch_size=8, workers=0, views=4, image_size=16,
                             terms={"embed": 1.0, "label": 1.0}, mix="cutmix", mix_prob=0.5)  # hue: auto, 0.5
    r = clipkd.distill(tiny_world / "train", tmp_path / "run", cfg, teacher="fake", text=tmp_path / "text.npz",
                       split=tiny_world / "split.json", device="cpu", progress=False)
    labels = torch.cat(seen_labels)
    assert (labels == -100).any() and (labels >= 0).any()  # mixed/recoloured views unlabelled, plain views labelled
    assert not wrong, wrong[:3]
    plan = ViewPlan.load(r.out / "views" / "views.json")
    pos = {p: i for i, p in enumerate(plan.images)}
    views = [(pos[k.rpartition("#view=")[0]], int(k.rpartition("#view=")[2])) for k in labelled_keys]
    assert all(plan.keeps_label(i, k) for i, k in views)  # never a labelled recoloured or mixed view
    assert any(plan.partner[i][k] < 0 and plan.hue[i][k] for i in range(len(plan.images)) for k in range(4))
    keep = [plan.keeps_label(i, k) for i in range(len(plan.images)) for k in range(plan.views)]
    assert abs(float((labels >= 0).float().mean()) - sum(keep) / len(keep)) < 0.25
    with pytest.raises(ClipkdError, match="use `views`"):  # online mixing has no unmixed image to label
        clipkd.distill(tiny_world / "train", tmp_path / "bad", replace(cfg, views=0), teacher="fake",
                       text=tmp_path / "text.npz", device="cpu", progress=False)


def test_pool_images_get_views_in_the_same_teacher_pass(tiny_world, fake_teacher, tmp_path, monkeypatch):
    """The method and an unlabelled pool together (issue 26): with an online teacher, the pool's images get views
    like the training images in the one pass that embeds them, trained with teacher targets only (no label; a view
    may mix a training image with a pool image, both shown to the student anyway)."""
    import clipkd
    import clipkd.teachers
    import clipkd.teachers.factory

    monkeypatch.setattr(clipkd.teachers.factory, "check_teacher_spec", lambda spec: None)
    monkeypatch.setattr(clipkd.teachers, "load_teacher", lambda spec, **kw: fake_teacher)
    cfg = clipkd.TrainConfig(student="resnet10t", epochs=1, batch_size=8, workers=0, image_size=16)
    r = clipkd.distill(tiny_world / "train", tmp_path / "run", cfg, teacher="fake", split=tiny_world / "split.json",
                       extra_images=tiny_world / "val", device="cpu", progress=False)
    run = json.loads((r.out / "run.json").read_text())
    n_pool = len(list((tiny_world / "val").rglob("*.png")))
    n_seen = r.train_images - n_pool
    assert run["targets"] == "views" and run["train"]["views"] == 4 and run["extra_images"] == n_pool
    assert run["teacher_images"] == 4 * (n_seen + n_pool) == fake_teacher.calls  # one pass, pool included
    plan = ViewPlan.load(r.out / "views" / "views.json")
    pool = {str(p.resolve()) for p in (tiny_world / "val").rglob("*.png")}
    assert pool <= set(plan.images)
    # an unlabelled pool as a plain list (one path a line) or a CSV with a path column only: a pool has no labels
    # (both used to be refused for lacking a label column)
    paths = sorted(str(p.resolve()) for p in (tiny_world / "val").rglob("*.png"))
    (tmp_path / "pool.txt").write_text("\n".join(paths) + "\n")
    (tmp_path / "pool.csv").write_text("path\n" + "\n".join(paths) + "\n")
    for pool_list in ("pool.txt", "pool.csv"):
        src = clipkd.open_source(tmp_path / pool_list)
        assert src.kind == "list" and src.labels is None and sorted(str(src.root / k) for k in src.keys) == paths
    again = clipkd.distill(tiny_world / "train", tmp_path / "run-list", cfg, teacher="fake",
                           split=tiny_world / "split.json", extra_images=tmp_path / "pool.txt", device="cpu",
                           progress=False)
    assert json.loads((again.out / "run.json").read_text())["extra_images"] == n_pool
    with pytest.raises(ClipkdError, match="has no 'label' column"):
        clipkd.distill(tmp_path / "pool.csv", tmp_path / "nolabels", cfg, teacher="fake", device="cpu")
    with pytest.raises(ClipkdError, match="drop `store` and `extra_store`"):
        clipkd.distill(tiny_world / "train", tmp_path / "bad", replace(cfg, views=2), teacher="fake",
                       split=tiny_world / "split.json", extra_images=tiny_world / "val", extra_store=tmp_path / "x",
                       device="cpu", progress=False)


def test_view_hue_has_one_reading_in_the_store_and_in_distill(tmp_path):
    """`view_hue` is read by one function (data.views.resolve_view_hue) for `embed-images` and `distill` alike:
    auto is AUTO_HUE with views and 0 without, `true` is not a share (the store once took it as 1.0), and a
    nonzero share without views is refused in both."""
    from clipkd.data.views import AUTO_HUE, resolve_view_hue
    from clipkd.errors import ClipkdError
    from clipkd.store import embed_images

    from .conftest import image_folder

    assert resolve_view_hue("auto", True, "x") == AUTO_HUE and resolve_view_hue(None, False, "x") == 0.0
    assert resolve_view_hue(0.25, True, "x") == 0.25
    for bad in (True, "0.5", 1.5, -0.1, [0.5]):
        with pytest.raises(ClipkdError, match="must be in \\[0, 1\\]"):
            resolve_view_hue(bad, True, "x")
    images = image_folder(tmp_path / "imgs", n=4)
    with pytest.raises(ClipkdError, match="must be in \\[0, 1\\]"):
        embed_images("fake:teacher", images, tmp_path / "s", views=4, view_hue=True)
    with pytest.raises(ClipkdError, match="needs `views` ≥ 2"):
        embed_images("fake:teacher", images, tmp_path / "s", views=1, view_hue=0.5)
    assert not (tmp_path / "s").exists()


def test_views_have_one_meaning_in_the_store_and_in_distill():
    """``views`` reads alike everywhere (``count_views``): 0 and 1 are the image alone (no views drawn or stored),
    K ≥ 2 is K views; distill's config settles 1 to 0 (a mix, if any, online) as the store does."""
    from clipkd.data.views import count_views
    from clipkd.training.distill import TrainConfig, resolve_distill

    assert [count_views(v) for v in (0, 1, 2, 4)] == [0, 0, 2, 4]
    for bad in (-1, True, 2.0, "4"):
        with pytest.raises(ClipkdError, match="`views` must be an integer ≥ 0"):
            count_views(bad)
    teacher = "open_clip:ViT-B-32@random"
    plans = {v: resolve_distill(TrainConfig(views=v), teacher=teacher).cfg for v in (0, 1, 3)}
    assert (plans[0].views, plans[1].views, plans[3].views) == (0, 0, 3)
    assert plans[1] == plans[0] and plans[3].view_hue == 0.5 and plans[1].view_hue == 0.0
