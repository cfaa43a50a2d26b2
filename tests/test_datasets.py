"""Real-dataset readers (image lists, ImageNet wnids, xlsa17 .mat, CoOp) and seed-format compatibility."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from clipkd.cli import main
from clipkd.data.datasets import (
    coop_base_to_new,
    imagenet_classnames,
    load_labelled,
    read_image_list,
    read_xlsa17,
    xlsa_classname,
)
from clipkd.errors import ClipkdError
from clipkd.prompts import TextEmbeddings, import_seed_text
from clipkd.store import EmbeddingStore, embed_images, export_npy_folder, import_npy_folder


def _img(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)
    return path


def test_image_list_csv_and_tsv(tmp_path, capsys):
    for i in range(4):
        _img(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "list.csv").write_text("path,label\nimgs/0.png,cat\nimgs/1.png,dog\nimgs/2.png,cat\n")
    data = read_image_list(tmp_path / "list.csv")
    assert data.classnames == ["cat", "dog"] and data.labels == [0, 1, 0] and data.root == tmp_path
    (tmp_path / "list.tsv").write_text("path\tlabel\n" + "".join(f"{tmp_path}/imgs/{i}.png\tbird\n" for i in range(4)))
    assert load_labelled(tmp_path / "list.tsv").paths[0] == f"{tmp_path}/imgs/0.png"
    # wrong root: how many are missing and the first few
    with pytest.raises(ClipkdError, match=r"3 of the 3 images listed .* are not under .*other.*wrong image root"):
        read_image_list(tmp_path / "list.csv", root=tmp_path / "other")
    (tmp_path / "bad.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(ClipkdError, match="needs a header with a 'path' column"):
        read_image_list(tmp_path / "bad.csv")


def test_imagenet_wnid_folders_get_readable_names(tmp_path):
    assert imagenet_classnames(["n01440764", "n01443537"]) == ["tench", "goldfish"]
    assert imagenet_classnames(["n01440764", "cats"]) is None
    for w in ("n01443537", "n01440764"):
        _img(tmp_path / w / "a.JPEG")
    assert load_labelled(tmp_path).classnames == ["tench", "goldfish"]  # sorted-wnid order


def test_coop_base_to_new():
    s = coop_base_to_new(["a", "b", "c", "d", "e"])
    assert s.seen == ["a", "b", "c"] and s.unseen == ["d", "e"]


def _fake_xlsa(tmp_path, drop_field=None):
    from scipy.io import savemat

    names = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    files, labels = [], []
    for c, name in enumerate(names):
        for j in range(3):
            rel = f"CUB_200_2011/images/{name}/{name[4:]}_{j}.jpg"
            _img(tmp_path / "mydata" / rel, (40 * c, 50, 60))
            files.append(f"/BS/authors/work/data/CUB/{rel}")
            labels.append(c + 1)
    split = {"allclasses_names": np.array([[np.array([n])] for n in names], dtype=object),
             "trainval_loc": np.array([[1], [2], [4], [5]]), "test_seen_loc": np.array([[3], [6]]),
             "test_unseen_loc": np.array([[7], [8], [9]]), "att": np.zeros((3, 3))}
    res = {"image_files": np.array([[np.array([f])] for f in files], dtype=object),
           "labels": np.array(labels)[:, None], "features": np.zeros((2048, 9))}
    if drop_field:
        split.pop(drop_field, None)
    (tmp_path / "xlsa").mkdir(exist_ok=True)
    savemat(tmp_path / "xlsa" / "att_splits.mat", split)
    savemat(tmp_path / "xlsa" / "res101.mat", res)
    return tmp_path / "xlsa", tmp_path / "mydata"


def test_xlsa17_reader(tmp_path, capsys):
    splits, root = _fake_xlsa(tmp_path)
    data, split, parts = read_xlsa17(splits, root)
    assert data.classnames == ["black footed albatross", "laysan albatross", "sooty albatross"]
    assert split.seen == ["black footed albatross", "laysan albatross"] and split.unseen == ["sooty albatross"]
    assert parts["trainval"] == [0, 1, 3, 4] and parts["test_unseen"] == [6, 7, 8]  # 1-based -> 0-based
    assert data.paths[0] == "CUB_200_2011/images/001.Black_footed_Albatross/Black_footed_Albatross_0.jpg"
    assert main(["dataset", "xlsa17", "--splits", str(splits), "--images", str(root),
                 "--out", str(tmp_path / "out")]) == 0
    test = load_labelled(tmp_path / "out" / "test.csv")
    assert len(test.paths) == 5 and set(test.classnames) == set(data.classnames)
    assert json.loads((tmp_path / "out" / "split.json").read_text())["unseen"] == ["sooty albatross"]
    assert xlsa_classname("antelope") == "antelope"


def test_xlsa17_bad_inputs(tmp_path, capsys):
    splits, root = _fake_xlsa(tmp_path, drop_field="test_unseen_loc")
    with pytest.raises(ClipkdError, match=r"att_splits.mat lacks field\(s\) \['test_unseen_loc'\]"):
        read_xlsa17(splits, root)
    splits, root = _fake_xlsa(tmp_path)
    shutil.rmtree(root / "CUB_200_2011" / "images" / "003.Sooty_Albatross")
    with pytest.raises(ClipkdError, match=r"3 of the 9 xlsa17 images are not under .*Sooty"):
        read_xlsa17(splits, root)
    with pytest.raises(ClipkdError, match="none of the xlsa17 image files"):
        read_xlsa17(splits, tmp_path / "xlsa")
    assert main(["dataset", "xlsa17", "--splits", str(tmp_path / "nope"), "--images", str(root),
                 "--out", str(tmp_path / "o")]) == 2
    assert "xlsa17 file not found" in capsys.readouterr().err


def test_seed_npy_mirror_roundtrip(tiny_world, fake_teacher, tmp_path):
    store = embed_images(fake_teacher, tiny_world / "train", tmp_path / "store", progress=False)
    with pytest.raises(ClipkdError, match="same file name in different folders"):  # 00000.png in every class
        export_npy_folder(tmp_path / "store", tmp_path / "flat")
    assert export_npy_folder(tmp_path / "store", tmp_path / "npy", flat=False) == len(store)
    back = import_npy_folder(tmp_path / "npy", tiny_world / "train", tmp_path / "again", fake_teacher.identity,
                             progress=False)
    assert back.paths == store.paths
    assert np.allclose(back.embeddings().astype(np.float32), store.embeddings().astype(np.float32), atol=1e-3)


def test_seed_npy_flat_layout(tmp_path, caplog):
    rng = np.random.default_rng(0)
    (tmp_path / "npy").mkdir()
    for i in range(5):
        _img(tmp_path / "imgs" / f"c{i % 2}" / f"img{i}.jpg")
        if i < 3:
            np.save(tmp_path / "npy" / f"img{i}.npy", rng.normal(size=(1, 6)))
    (tmp_path / "npy" / "img3.npy").write_bytes(b"broken")  # img4 has none
    st = import_npy_folder(tmp_path / "npy", tmp_path / "imgs", tmp_path / "store", "open_clip:X@y", progress=False)
    assert len(st) == 3 and st.manifest["skipped_count"] == 1 and st.teacher == "open_clip:X@y"
    assert "1 of 5 images have no .npy" in caplog.text
    assert np.allclose(np.linalg.norm(st.embeddings().astype(np.float32), axis=1), 1, atol=1e-3)
    ref = np.load(tmp_path / "npy" / "img0.npy").ravel()
    row = st.embeddings()[st.rows(["c0/img0.jpg"])[0]].astype(np.float32)
    assert np.allclose(row, ref / np.linalg.norm(ref), atol=1e-3)
    assert export_npy_folder(tmp_path / "store", tmp_path / "back") == 3
    assert np.allclose(np.load(tmp_path / "back" / "img0.npy"), row)
    assert EmbeddingStore(tmp_path / "store").embed_dim == 6


def test_seed_text_import(tmp_path):
    (tmp_path / "text_prompts.txt").write_text("a photo of a tench.\na photo of a goldfish.\n")
    np.save(tmp_path / "text.npy", np.array([[3.0, 4.0], [0.0, 2.0]]))
    emb = import_seed_text(tmp_path / "text_prompts.txt", tmp_path / "text.npy", "open_clip:X@y")
    assert emb.classnames == ["tench", "goldfish"] and np.allclose(emb.embeddings[0], [0.6, 0.8])
    assert main(["import-text", "--prompts", str(tmp_path / "text_prompts.txt"), "--embeddings",
                 str(tmp_path / "text.npy"), "--teacher", "open_clip:X@y", "--out", str(tmp_path / "t.npz")]) == 0
    assert TextEmbeddings.load(tmp_path / "t.npz").teacher == "open_clip:X@y"
    np.save(tmp_path / "bad.npy", np.zeros((3, 2)))
    with pytest.raises(ClipkdError, match=r"shape \(3, 2\), but .* names 2 classes"):
        import_seed_text(tmp_path / "text_prompts.txt", tmp_path / "bad.npy", "x")


def test_lists_drive_embed_distill_and_eval(tiny_world, fake_teacher, tmp_path):
    from clipkd.data.datasets import write_image_list
    from clipkd.data.folders import scan_image_folder
    from clipkd.evaluation.zeroshot import evaluate
    from clipkd.prompts import embed_prompts
    from clipkd.training.distill import TrainConfig, distill

    data = scan_image_folder(tiny_world / "train")
    absolute = type(data)(data.root, [str(data.root / p) for p in data.paths], data.labels, data.classnames)
    write_image_list(tmp_path / "train.csv", absolute)
    store = embed_images(fake_teacher, tmp_path / "train.csv", tmp_path / "store", progress=False)
    assert len(store) == len(data.paths) and store.paths[0].startswith("/")
    text = embed_prompts(fake_teacher, {c: [c] for c in data.classnames})
    text.save(tmp_path / "text.npz")
    run = distill(tmp_path / "train.csv", tmp_path / "run", TrainConfig(student="resnet10t", epochs=1, batch_size=16,
                                                                        workers=0), store=tmp_path / "store",
                  split=tiny_world / "split.json", device="cpu", progress=False)
    r = evaluate(str(run.path), tiny_world / "test", text=tmp_path / "text.npz", split=tiny_world / "split.json",
                 device="cpu", progress=False)
    assert 0 <= r.H <= 1


def test_list_images_walks_folders_symlinks_and_loops(tmp_path, monkeypatch):
    """Sorted POSIX paths of image files by extension (any case), through nested and symlinked folders (each once,
    a symlink loop ends), without broken links, other files or directories named like images."""
    import os

    from clipkd.data.folders import list_images

    root = tmp_path / "imgs"
    for rel in ("b/2.JPG", "b/sub/3.png", "a/1.jpg", ".hidden/4.webp", "top.jpeg", "notes.txt", "a/x.tif"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / "dir.jpg").mkdir()  # a folder named like an image is walked, not listed
    (root / "dir.jpg" / "5.png").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "6.jpg").write_bytes(b"x")
    os.symlink(outside, root / "linked")
    os.symlink(root, root / "b" / "loop")  # a cycle: must end
    os.symlink(root / "missing.jpg", root / "broken.jpg")
    got = list_images(root)
    assert got == sorted(["b/2.JPG", "b/sub/3.png", "a/1.jpg", ".hidden/4.webp", "top.jpeg", "a/x.tif",
                          "dir.jpg/5.png", "linked/6.jpg"]), got
    real_scandir = os.scandir

    def denied(path):  # as a folder without read permission behaves for a non-root user
        if str(path).endswith("/a"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    import clipkd.data.folders as folders

    monkeypatch.setattr(folders.os, "scandir", denied)
    with pytest.raises(ClipkdError, match="cannot read folder .*/a: Permission denied"):
        list_images(root)  # an unreadable folder is an error, not images silently left out


def test_imported_stores_and_text_record_the_identity_the_teacher_reports(tmp_path, tiny_world):
    """store-import and import-text used to record the spec as typed, so the same teacher's own online targets,
    stores and text embeddings (which carry its identity: a weights file's name and fingerprint, a run folder's
    model) were refused later as another teacher's. They now record the identity the loaded teacher reports."""
    import torch

    from clipkd.teachers import load_clip, load_teacher
    from clipkd.teachers.factory import teacher_identity

    torch.manual_seed(0)
    spec = load_clip("open_clip:clipkd-micro").save(tmp_path / "teacher")  # open_clip:clipkd-micro@/abs/file.pt
    teacher = load_teacher(spec, device="cpu")
    assert teacher_identity(spec) == teacher.identity != spec
    assert teacher_identity("open_clip:clipkd-micro@random") == load_teacher("open_clip:clipkd-micro@random",
                                                                              device="cpu").identity
    assert teacher_identity("some other tool's label") == "some other tool's label"
    store = embed_images(teacher, tiny_world / "train", tmp_path / "store", workers=0, progress=False)
    export_npy_folder(store.root, tmp_path / "npy", flat=False)
    back = import_npy_folder(tmp_path / "npy", tiny_world / "train", tmp_path / "again", spec, progress=False)
    assert back.teacher == store.teacher == teacher.identity
    back.check_teacher(teacher.identity)  # the online teacher and the imported store are one teacher's
    np.save(tmp_path / "text.npy", np.eye(2, teacher.embed_dim))
    (tmp_path / "text_prompts.txt").write_text("a cat\na dog\n")
    assert import_seed_text(tmp_path / "text_prompts.txt", tmp_path / "text.npy", spec).teacher == teacher.identity
