"""Nothing silently wrong: each way a user could get a wrong result with exit code 0 is refused or made right."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipkd.cli import main
from clipkd.data.folders import scan_image_folder
from clipkd.data.loader import load_rgb
from clipkd.data.splits import load_split
from clipkd.errors import ClipkdError
from clipkd.fileio import exclusive
from clipkd.store import EmbeddingStore, embed_images
from clipkd.training.distill import TrainConfig, distill, train_supervised

from .conftest import CLI, FakeTeacher, write_image
from .conftest import cli_env as _env
from .conftest import image_folder as _folder

SMALL = TrainConfig(student="resnet10t", epochs=1, batch_size=8, lr=1e-3, image_size=32, workers=0)


def _exit_code(args: list[str]) -> int:
    """``main(args)``'s exit code, argparse's usage errors included."""
    try:
        return main(args)
    except SystemExit as e:
        return int(e.code)


# --- 1. concurrent writers -------------------------------------------------------------------------------------------

def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys; from clipkd.fileio import exclusive\n"
            f"with exclusive({str(folder)!r}):\n    print('locked', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=_env())
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_of_a_store_is_refused_and_two_racing_writers_lose_nothing(tmp_path):
    imgs = _folder(tmp_path / "imgs", n=40)
    teacher = tmp_path / "teacher"
    from clipkd.teachers import load_clip

    spec = load_clip("open_clip:clipkd-micro").save(teacher)
    store = tmp_path / "store"
    holder = _hold_lock(store)  # another process is writing this store
    try:
        r = subprocess.run([*CLI, "embed-images", "--teacher", spec, "--images", str(imgs), "--out", str(store),
                            "--device", "cpu", "--workers", "0"], capture_output=True, text=True, env=_env())
    finally:
        holder.stdin.close()
        holder.wait()
    assert r.returncode == 2 and "in use by another clipkd process" in r.stderr, r.stderr
    # two real writers at once, small shards: whichever order they run in, no row is lost or doubled
    cmd = [*CLI, "embed-images", "--teacher", spec, "--images", str(imgs), "--out", str(store), "--device", "cpu",
           "--workers", "0", "--shard-size", "4", "--batch-size", "4"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    outs = [(p.wait(), p.stderr.read()) for p in procs]
    for rc, err in outs:
        assert rc == 0 or (rc == 2 and "in use by another clipkd process" in err), err
    assert any(rc == 0 for rc, _ in outs)
    st = EmbeddingStore(store)
    assert len(st) == 40 and sorted(st.paths) == sorted(set(st.paths)) and st.embeddings().shape == (40, 64)


def test_run_folder_in_use_is_refused(tmp_path, tiny_world):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        with pytest.raises(ClipkdError, match="in use by another clipkd process"):
            train_supervised(tiny_world / "train", out, SMALL, split=tiny_world / "split.json", device="cpu",
                             progress=False)
    finally:
        holder.stdin.close()
        holder.wait()


# --- 2. a store is tied to its images --------------------------------------------------------------------------------

def test_store_refuses_other_images_with_the_same_names(tmp_path):
    a = _folder(tmp_path / "world" / "train", seed=0)
    b = _folder(tmp_path / "world" / "test", seed=1)  # same relative names, other pictures (other sizes)
    for i in range(12):  # make every size differ, as different pictures usually do
        Image.fromarray(np.zeros((30 + i % 3, 21, 3), np.uint8)).save(b / f"c{i % 2}" / f"{i}.png")
    st = embed_images(FakeTeacher(), a, tmp_path / "store", workers=0, progress=False)
    paths = scan_image_folder(b).paths
    with pytest.raises(ClipkdError, match="holds embeddings of other files"):
        st.targets(paths, root=b)
    with pytest.raises(ClipkdError, match="holds embeddings of other files"):
        embed_images(FakeTeacher(), b, tmp_path / "store", workers=0, progress=False)  # would add nothing
    # the same images moved elsewhere (a copied folder) are still the store's images
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(a, moved)
    assert len(st.targets(paths, root=moved).keep) == 12
    assert EmbeddingStore(tmp_path / "store").sizes().min() > 0


# --- 3. re-running into a run folder ---------------------------------------------------------------------------------

def test_rerun_with_other_settings_is_refused_unless_overwrite(tmp_path, tiny_world, fake_teacher):
    store = embed_images(fake_teacher, tiny_world / "train", tmp_path / "store", workers=0, progress=False).root
    split = tmp_path / "split.json"
    shutil.copy(tiny_world / "split.json", split)
    kw = {"store": store, "split": split, "device": "cpu", "progress": False}
    out = tmp_path / "run"
    first = distill(tiny_world / "train", out, SMALL, **kw)
    before = first.path.stat().st_mtime_ns
    again = distill(tiny_world / "train", out, SMALL, **kw)  # same recipe: resumes the finished run
    assert again.path == first.path
    # a run recorded by an older clipkd, before a setting existed: still resumed while the new setting is off
    recipe = json.loads((out / "recipe.json").read_text())
    for new_setting in ("qat", "sparsity", "init"):
        del recipe["settings"][new_setting]
    for ident in recipe["inputs"].values():  # ... and before inputs were identified by their content
        if isinstance(ident, dict):
            ident.pop("sha256", None)
    (out / "recipe.json").write_text(json.dumps(recipe))
    steps = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    distill(tiny_world / "train", out, SMALL, **kw)  # resumed (finished: no step trained), not refused or retrained
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == steps
    with pytest.raises(ClipkdError, match=r"settings.sparsity: .* → '2:4'"):
        distill(tiny_world / "train", out, TrainConfig(**{**SMALL.__dict__, "sparsity": "2:4"}), **kw)
    other = TrainConfig(**{**SMALL.__dict__, "lr": 5e-3})
    with pytest.raises(ClipkdError, match=r"other settings \(settings.lr: 0.001 → 0.005"):
        distill(tiny_world / "train", out, other, **kw)
    store2 = embed_images(FakeTeacher("fake:teacher@v2"), tiny_world / "train", tmp_path / "store2", workers=0,
                          progress=False).root
    with pytest.raises(ClipkdError, match="inputs.store"):
        distill(tiny_world / "train", out, SMALL, **{**kw, "store": store2})
    same_size = split.read_text().replace('{\n  "seen"', '{ \n "seen"', 1)  # another file of the same byte count
    assert len(same_size) == split.stat().st_size and same_size != split.read_text()
    split.write_text(same_size)
    with pytest.raises(ClipkdError, match=r"inputs.split.sha256"):
        distill(tiny_world / "train", out, SMALL, **kw)
    assert json.loads((out / "run.json").read_text())["train"]["lr"] == 1e-3  # the old run is untouched
    distill(tiny_world / "train", out, other, overwrite=True, **kw)
    assert json.loads((out / "run.json").read_text())["train"]["lr"] == 5e-3
    assert json.loads((out / "recipe.json").read_text())["settings"]["lr"] == 5e-3
    assert first.path.stat().st_mtime_ns != before
    # the same through the CLI, for train-supervised: one line, exit 2
    base = ["-q", "train-supervised", "--images", str(tiny_world / "train"), "--split", str(tiny_world / "split.json"),
            "--out", str(tmp_path / "sup"), "--epochs", "1", "--batch-size", "8", "--image-size", "32", "--workers",
            "0", "--device", "cpu"]
    assert main(base) == 0
    assert main([*base, "--lr", "0.01"]) == 2


# --- 4. image modes --------------------------------------------------------------------------------------------------

def _reference() -> np.ndarray:
    y, x = np.mgrid[0:24, 0:32]
    return np.stack([x * 8, y * 10, (x + y) * 4], -1).astype(np.uint8)


def test_every_image_mode_decodes_like_its_8bit_reference(tmp_path):
    ref = _reference()
    grey = ref[..., 0]
    cases: dict[str, tuple[Image.Image, np.ndarray]] = {
        "i16.png": (Image.fromarray(grey.astype(np.uint16) * 257), grey),  # 16-bit: Pillow's convert clips to white
        "i32.tif": (Image.fromarray(grey.astype(np.int32) * 257, "I"), grey),
        "f32.tif": (Image.fromarray(grey.astype(np.float32) / 255.0, "F"), grey),
        "cmyk.tif": (Image.fromarray(ref).convert("CMYK"), ref),
        "rgba.png": (Image.fromarray(np.dstack([ref, np.full(grey.shape, 255, np.uint8)]), "RGBA"), ref),
        "la.png": (Image.fromarray(np.dstack([grey, np.full(grey.shape, 255, np.uint8)]), "LA"), grey),
    }
    for name, (img, want) in cases.items():
        img.save(tmp_path / name)
        got = np.asarray(load_rgb(tmp_path / name)).astype(int)
        want3 = np.repeat(want[..., None], 3, -1) if want.ndim == 2 else want
        assert np.abs(got - want3).max() <= 1, name
    # transparent pixels show as a viewer shows them on white; palette transparency too
    rgba = np.dstack([ref, np.zeros(grey.shape, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert np.asarray(load_rgb(tmp_path / "clear.png")).min() == 255
    pal = Image.fromarray(ref).convert("P")
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])
    pal.save(tmp_path / "pal.png", transparency=pal.info["transparency"])
    assert tuple(np.asarray(load_rgb(tmp_path / "pal.png"))[0, 0]) == (255, 255, 255)
    # EXIF orientation: stored upside down with orientation 3, shown upright
    flipped = Image.fromarray(ref).rotate(180)
    exif = Image.Exif()
    exif[0x0112] = 3
    flipped.save(tmp_path / "exif.png", exif=exif)
    assert np.abs(np.asarray(load_rgb(tmp_path / "exif.png")).astype(int) - ref).max() == 0


# --- 5. untrained models ---------------------------------------------------------------------------------------------

def test_zero_step_training_is_an_error(tmp_path, tiny_world):
    with pytest.raises(ClipkdError, match="`epochs` must be an integer ≥ 1"):
        train_supervised(tiny_world / "train", tmp_path / "a", TrainConfig(**{**SMALL.__dict__, "epochs": 0}),
                         device="cpu", progress=False)
    broken = tmp_path / "broken"
    for i in range(16):
        (broken / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (broken / f"c{i % 2}" / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(ClipkdError, match="no training step ran.*16 of 16 images could not be decoded"):
        train_supervised(broken, tmp_path / "b", SMALL, device="cpu", progress=False)
    assert not (tmp_path / "b" / "student.pt").exists()


def test_online_teacher_path_counts_and_names_skipped_images(tmp_path, tiny_world, caplog):
    import shutil

    world = tmp_path / "train"
    shutil.copytree(tiny_world / "train", world)
    data = scan_image_folder(world)
    seen = json.loads((tiny_world / "split.json").read_text())["seen"]
    bad = world / next(p for p, y in zip(data.paths, data.labels, strict=True) if data.classnames[y] in seen)
    bad.write_bytes(b"broken")
    spec = _teacher_file(tmp_path)
    with caplog.at_level("WARNING"):
        r = distill(world, tmp_path / "run", SMALL, teacher=spec, split=tiny_world / "split.json", device="cpu",
                    progress=False)
    assert r.skipped_images == 1
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["skipped_images"] == 1 and info["skipped"] == [bad.relative_to(world).as_posix()]
    assert "could not be decoded" in caplog.text


def _teacher_file(tmp_path: Path) -> str:
    from clipkd.teachers import load_clip

    return load_clip("open_clip:clipkd-micro").save(tmp_path / "teacher")


# --- 6. a killed job does not report success -------------------------------------------------------------------------

def _ckpt_epoch(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])


def _wait_for_checkpoint(p: subprocess.Popen, last: Path, newer_than: tuple[int, int] | None, min_epoch: int) -> int:
    """Poll (fast) until ``last`` is a checkpoint other than ``newer_than`` (inode, mtime) of at least ``min_epoch``
    epochs; the epoch of the first such checkpoint seen."""
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if last.is_file():
            st = last.stat()
            if (st.st_ino, st.st_mtime_ns) != newer_than:
                try:
                    epoch = _ckpt_epoch(last)
                except Exception:  # noqa: BLE001 - replaced while being read: look again
                    continue
                if newer_than is not None or epoch >= min_epoch:
                    return epoch
        time.sleep(0.02)
    raise AssertionError(f"no new checkpoint at {last} (exit {p.poll()})")


def test_sigterm_exits_nonzero_and_the_same_command_resumes_from_its_checkpoint(tmp_path, tiny_world):
    """SIGTERM: exit 143, no student.pt, and the same command run again goes on from the next epoch (a fresh start
    would write epoch 0 first), then stops the same way when killed again."""
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    cmd = [*CLI, "train-supervised", "--images", str(tiny_world / "train"), "--split", str(tiny_world / "split.json"),
           "--out", str(out), "--epochs", "200", "--batch-size", "8", "--image-size", "32", "--workers", "0",
           "--device", "cpu"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_checkpoint(p, last, None, min_epoch=2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert "interrupted (SIGTERM); re-run the same command to resume" in err
    assert not (out / "student.pt").exists()
    stopped = _ckpt_epoch(last)
    assert stopped >= 2
    st = last.stat()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    seen = _wait_for_checkpoint(p, last, (st.st_ino, st.st_mtime_ns), min_epoch=0)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert stopped < seen <= stopped + 2, (stopped, seen)  # resumed: it went on from where it stopped
    assert p.returncode == 143 and not (out / "student.pt").exists(), err[-2000:]


# --- 7. a teacher spec without weights --------------------------------------------------------------------------------

def test_teacher_without_weights_is_refused_before_work(tmp_path, tiny_world, capsys):
    args = ["distill", "--images", str(tiny_world / "train"), "--teacher", "open_clip:clipkd-micro",
            "--out", str(tmp_path / "r"), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "names no weights" in err and "@random" in err
    assert not (tmp_path / "r").exists()


# --- 8. class names with hyphens -------------------------------------------------------------------------------------

def test_hyphenated_class_names_and_split_files_by_folder_or_name(tmp_path):
    for folder in ("t-shirt", "yo-yo", "go_kart"):
        write_image(tmp_path / "imgs" / folder / "a.png")
    data = scan_image_folder(tmp_path / "imgs")
    assert data.classnames == ["go kart", "t-shirt", "yo-yo"]
    (tmp_path / "split.json").write_text(json.dumps({"seen": ["t-shirt", "go_kart"], "unseen": ["yo-yo"]}))
    sp = load_split(tmp_path / "split.json", data.classnames, data.aliases)
    assert sp.seen == ["t-shirt", "go kart"] and sp.unseen == ["yo-yo"]
    (tmp_path / "bad.json").write_text(json.dumps({"seen": ["tshirt"], "unseen": []}))
    with pytest.raises(ClipkdError, match="'go_kart' → 'go kart'"):
        load_split(tmp_path / "bad.json", data.classnames, data.aliases)


# --- one-line errors before any work ---------------------------------------------------------------------------------

def test_bad_inputs_are_one_line_errors(tmp_path, tiny_world, capsys):
    spec = _teacher_file(tmp_path)
    train = ["distill", "--images", str(tiny_world / "train"), "--teacher", spec, "--device", "cpu"]
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty.pt").write_bytes(b"")
    student_pt = tmp_path / "student.pt"
    student_pt.write_bytes(b"\x80\x02truncated")
    for name, value in {"fast": '"fast"', "true": "true", "epochs": 2.5}.items():
        (tmp_path / f"{name}.json").write_text(f'{{"{"epochs" if name == "epochs" else "lr"}": {value}}}')
    cases = [
        # a recipe value of the wrong type: a traceback ("fast") or training with lr = True, before
        ([*train, "--out", str(tmp_path / "r1"), "--config", str(tmp_path / "fast.json")],
         "lr must be float, got 'fast'"),
        ([*train, "--out", str(tmp_path / "r2"), "--config", str(tmp_path / "true.json")],
         "lr must be float, got True"),
        (["clip-train", "--images", str(tiny_world / "train"), "--captions",
          str(tiny_world / "train" / "captions_en.csv"), "--out", str(tmp_path / "r3"), "--config",
          str(tmp_path / "epochs.json")], "epochs must be int, got 2.5"),

        ([*train, "--out", str(tmp_path / "o1"), "--batch-size", "0"], "must be at least 1"),
        ([*train, "--out", str(tmp_path / "o2"), "--workers", "-1"], "must be 0 or more"),
        ([*train, "--out", str(tmp_path / "a_file")], "exists and is not a folder"),
        ([*train, "--out", str(tmp_path / "o3"), "--student", str(student_pt)], "not a file"),
        ([*train, "--out", str(tmp_path / "o4"), "--student", "open_clip:clipkd-micro@random"], "not a CLIP spec"),
        (["embed-images", "--teacher", f"open_clip:clipkd-micro@{tmp_path / 'empty.pt'}", "--images",
          str(tiny_world / "train"), "--out", str(tmp_path / "s"), "--device", "cpu"], "does not fit"),
        (["embed-images", "--teacher", spec, "--images", str(tiny_world / "train"), "--out",
          str(tmp_path / "a_file"), "--device", "cpu"], "exists and is not a folder"),
        (["eval", "--model", str(student_pt), "--images", str(tiny_world / "test"), "--device", "cpu"],
         "cannot read student checkpoint"),
        (["eval", "--model", str(tmp_path / "empty.pt"), "--images", str(tiny_world / "test"), "--device", "cpu"],
         "cannot read student checkpoint"),
        # outputs through a file, before any model loads (they used to end in a traceback after the work)
        (["eval", "--model", spec, "--images", str(tiny_world / "test"), "--out", str(tmp_path / "a_file" / "r.json"),
          "--device", "cpu"], "a_file exists and is not a folder"),
        (["embed-text", "--teacher", spec, "--classes", str(tiny_world / "train"), "--out",
          str(tmp_path / "a_file" / "t.npz"), "--device", "cpu"], "a_file exists and is not a folder"),
        (["export", "--model", spec, "--out", str(tmp_path / "a_file" / "m.onnx")],
         "a_file exists and is not a folder"),
        (["embed-images", "--teacher", spec, "--images", str(tmp_path / "shards" / "{000..002.tar"), "--out",
          str(tmp_path / "s2")], "unbalanced braces"),
    ]
    for args, message in cases:
        assert _exit_code(args) == 2, args
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]  # argparse prints its usage above the error line
        assert message in last and last.startswith("clipkd"), (args, err)
        assert "Traceback" not in err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o500)
        assert main([*train, "--out", str(locked / "run")]) == 2
        assert "cannot create" in capsys.readouterr().err


def test_truncated_resume_checkpoint_is_a_one_line_error(tmp_path, tiny_world):
    out = tmp_path / "run"
    kw = {"split": tiny_world / "split.json", "device": "cpu", "progress": False}
    train_supervised(tiny_world / "train", out, SMALL, **kw)
    ckpt = out / "checkpoints" / "last.ckpt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    with pytest.raises(ClipkdError, match="resume checkpoint .* is damaged"):
        train_supervised(tiny_world / "train", out, SMALL, **kw)
    # corrupted mid-file (the zip's directory intact): found by the members' CRCs, not by torch.load's traceback
    middle = len(good) // 2
    ckpt.write_bytes(good[:middle] + bytes(b ^ 0xFF for b in good[middle : middle + 64]) + good[middle + 64 :])
    with pytest.raises(ClipkdError, match="resume checkpoint .* is damaged"):
        train_supervised(tiny_world / "train", out, SMALL, **kw)
    assert not list((out / "checkpoints").glob(".*partial"))  # checkpoints are written whole, then renamed


def test_a_checkpoint_damaged_mid_file_is_refused_wherever_it_is_loaded(tmp_path, tiny_world, capsys):
    """A student whose weights are zeroed mid-file (the zip's directory intact, torch.load reads it): eval, export,
    index build and predict used to run on the damaged weights and exit 0; each is one line naming the file. So is
    an open_clip checkpoint damaged the same way."""
    from clipkd.students.model import Student, StudentConfig, save_student
    from clipkd.teachers import load_clip

    torch.manual_seed(0)
    pt = tmp_path / "student" / "student.pt"
    save_student(pt, Student(StudentConfig("resnet10t", 16, image_size=32, teacher="fake:teacher@v1")))
    good = pt.read_bytes()
    middle = len(good) // 2
    pt.write_bytes(good[:middle] + bytes(4096) + good[middle + 4096:])
    (tmp_path / "classes.txt").write_text("a\nb\n")
    write_image(tmp_path / "ok.png")
    test = str(tiny_world / "test")
    for args in (["eval", "--model", str(pt), "--images", test],
                 ["export", "--model", str(pt.parent), "--out", str(tmp_path / "s.onnx"), "--images", test],
                 ["index", "build", "--model", str(pt.parent), "--images", test, "--out", str(tmp_path / "index")],
                 ["predict", "--model", str(pt), "--classes", str(tmp_path / "classes.txt"), str(tmp_path / "ok.png")]):
        assert main([*args, "--device", "cpu"] if args[0] != "export" else args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.splitlines()[-1].startswith("clipkd") and "is damaged" in err and "student.pt" in err, (args, err)
        assert "Traceback" not in err
    spec = load_clip("open_clip:clipkd-micro@random").save(tmp_path / "clip")
    weights = Path(spec.rpartition("@")[2])
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2] + bytes(4096) + blob[len(blob) // 2 + 4096:])
    with pytest.raises(ClipkdError, match="checkpoint .* is damaged"):
        load_clip(spec)


def test_clip_train_run_folder_works_from_another_directory(tmp_path, tiny_world, monkeypatch):
    from clipkd.training.clip_train import ClipTrainConfig, clip_train

    cfg = ClipTrainConfig(model="open_clip:clipkd-micro", epochs=1, batch_size=16, workers=0)
    monkeypatch.chdir(tmp_path)
    first = clip_train(tiny_world / "train", tiny_world / "train" / "captions_en.csv", "run", cfg, device="cpu",
                       progress=False)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = clip_train(tiny_world / "train", tiny_world / "train" / "captions_en.csv", "../run", cfg, device="cpu",
                       progress=False)
    assert again.spec == first.spec and Path(again.spec.split("@", 1)[1]).is_file()


def test_exclusive_lock_is_reentrant_across_sequential_uses(tmp_path):
    with exclusive(tmp_path / "x"):
        pass
    with exclusive(tmp_path / "x"):
        pass


def test_written_files_follow_the_umask(tmp_path, fake_teacher):
    """Atomic writes used to leave every file 0600 (``mkstemp``'s mode) whatever the umask: a serving user or group
    could not read the store, index or model. Files now get the mode a plain ``open`` would."""
    import stat

    from clipkd.fileio import write_json
    from clipkd.store import embed_images

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        embed_images(fake_teacher, _folder(tmp_path / "imgs", n=4), tmp_path / "store", workers=0, progress=False)
        modes = {stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "store").iterdir()
                 if f.is_file() and not f.name.startswith(".")}
        assert modes == {0o644}, modes
        os.umask(0o027)
        write_json(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_predict_fails_when_no_file_could_be_read(tmp_path, capsys):
    """predict exited 0 when every file failed; one readable file among bad ones is still a success."""
    from clipkd.teachers import load_clip

    spec = load_clip("open_clip:clipkd-micro").save(tmp_path / "clip")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    args = ["predict", "--model", spec, "--classes", str(tmp_path / "classes.txt"), "--device", "cpu"]
    assert main([*args, str(tmp_path / "bad.jpg"), str(tmp_path / "missing.png")]) == 2
    assert "none of the 2 file(s) could be read" in capsys.readouterr().err
    write_image(tmp_path / "ok.png")
    assert main([*args, str(tmp_path / "bad.jpg"), str(tmp_path / "ok.png")]) == 0
    out = capsys.readouterr().out
    assert "bad.jpg: skipped" in out and "ok.png: " in out


def test_a_disk_that_fills_during_embed_images_is_one_line_and_leaves_no_orphan(tmp_path, monkeypatch, capsys):
    """numpy's short write on a full disk ("N requested and M written", no errno) used to end in a traceback, the
    error naming the temporary file, with a shard's paths file left behind outside the manifest. Now: one line
    naming the output file and the space left; the store keeps its finished shards and nothing else; the re-run
    finishes."""
    import clipkd.fileio

    images = _folder(tmp_path / "imgs", n=12)
    real = np.save
    calls = {"n": 0}

    def short_write(f, array, *a, **kw):  # the third shard's embeddings hit a full disk
        if getattr(array, "dtype", None) == np.float16:
            calls["n"] += 1
            if calls["n"] == 3:
                f.write(b"\x93NUMPY")
                raise OSError(f"{array.size} requested and 3 written")
        return real(f, array, *a, **kw)

    monkeypatch.setattr(clipkd.fileio.np, "save", short_write)
    monkeypatch.setattr("clipkd.teachers.load_teacher", lambda *a, **kw: FakeTeacher())
    monkeypatch.setattr("clipkd.teachers.factory.check_teacher_spec", lambda spec: None)
    args = ["embed-images", "--teacher", "fake", "--images", str(images), "--out", str(tmp_path / "store"),
            "--batch-size", "4", "--shard-size", "4", "--workers", "0", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # after the progress bar
    assert "Traceback" not in err and last.startswith("clipkd embed-images: error: "), err
    assert f"cannot write {tmp_path / 'store' / 'shard-00002.npy'}: 32 requested and 3 written" in last
    assert "MiB free on its disk" in err and ".tmp" not in err
    left = sorted(p.name for p in (tmp_path / "store").iterdir() if p.name.startswith(("shard", ".shard")))
    assert left == [f"shard-0000{i}{ext}" for i in (0, 1) for ext in (".fp.npy", ".npy", ".size.npy", ".txt")]
    monkeypatch.setattr(clipkd.fileio.np, "save", real)
    assert main(args) == 0 and len(EmbeddingStore(tmp_path / "store")) == 12


@pytest.mark.parametrize("damage", ["paths gone", "sizes gone", "rows truncated"])
def test_a_damaged_store_is_one_line_and_embed_images_repairs_it(tmp_path, damage):
    """A store with a shard's file gone or truncated used to end in a traceback, and ``embed-images`` over it
    reported the full count and repaired nothing. Readers now name the shard in one line; re-running the
    embed-images drops the damaged shard and embeds its images again, to the same embeddings."""
    images = _folder(tmp_path / "imgs", n=12)
    st = embed_images(FakeTeacher(), images, tmp_path / "store", batch_size=4, shard_size=4, workers=0, progress=False)
    before = dict(zip(st.paths, st.embeddings().astype(np.float32), strict=True))
    shard = tmp_path / "store" / "shard-00001"
    if damage == "paths gone":
        Path(f"{shard}.txt").unlink()
    elif damage == "sizes gone":
        Path(f"{shard}.size.npy").unlink()
    else:
        Path(f"{shard}.npy").write_bytes(Path(f"{shard}.npy").read_bytes()[:100])
    damaged = EmbeddingStore(tmp_path / "store")
    with pytest.raises(ClipkdError, match="is damaged: shard shard-00001.*re-run the embed-images"):
        damaged.targets(scan_image_folder(images).paths, root=images)
    again = embed_images(FakeTeacher(), images, tmp_path / "store", batch_size=4, shard_size=4, workers=0,
                         progress=False)
    assert len(again) == 12 and "shard-00001.npy" not in [s["file"] for s in again.manifest["shards"]]
    after = dict(zip(again.paths, again.embeddings().astype(np.float32), strict=True))
    assert sorted(after) == sorted(before) and all(np.allclose(after[p], before[p], atol=1e-3) for p in before)
    assert len(again.targets(scan_image_folder(images).paths, root=images).keep) == 12


def test_damaged_index_files_are_one_line_errors(tmp_path, tiny_world, capsys):
    """The FAISS file or rows.npy truncated or gone, the generation gone, ``kind`` edited, the ``model`` key removed:
    one line naming the index and the command that rebuilds it, not a traceback."""
    import shutil

    from clipkd.search.writers import build_index
    from clipkd.teachers import load_clip

    torch.manual_seed(0)
    spec = load_clip("open_clip:clipkd-micro").save(tmp_path / "teacher")
    good = build_index(spec, tiny_world / "val", tmp_path / "ix", device="cpu", workers=0, progress=False).root

    def _gen(ix):
        return ix / "gen" / str(json.loads((ix / "index.json").read_text())["generation"])

    def _truncate(f):
        f.write_bytes(f.read_bytes()[:9])

    def damaged(name, edit):
        ix = tmp_path / name
        shutil.copytree(good, ix)
        edit(ix)
        return ix

    def edit_json(key, value):
        def edit(ix):
            info = json.loads((ix / "index.json").read_text())
            info.pop(key) if value is None else info.update({key: value})
            (ix / "index.json").write_text(json.dumps(info))
        return edit

    cases = {
        "faiss truncated": damaged("a", lambda ix: _truncate(_gen(ix) / "faiss.index")),
        "rows gone": damaged("b", lambda ix: (_gen(ix) / "rows.npy").unlink()),
        "generation gone": damaged("f", lambda ix: shutil.rmtree(_gen(ix))),
        "kind edited": damaged("c", edit_json("kind", "hnsw")),
        "kind unknown": damaged("d", edit_json("kind", "bogus")),
        "model removed": damaged("e", edit_json("model", None)),
    }
    capsys.readouterr()  # the build's own notes (logging may already go to stderr, set up by an earlier CLI call)
    for what, ix in cases.items():
        assert main(["search", "--index", str(ix), "--text", "a red circle"]) == 2, what
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"index {ix} is damaged" in err and "clipkd index build" in err, (what, err)


def test_sigterm_during_embed_images_says_so_and_the_rerun_finishes(tmp_path):
    """A SIGTERM used to end embed-images with exit 143 and nothing printed: now one line says what happened, the
    finished shards are kept, and the same command finishes the store."""
    from clipkd.teachers import load_clip

    torch.manual_seed(0)
    spec = load_clip("open_clip:clipkd-micro").save(tmp_path / "teacher")
    images = tmp_path / "imgs" / "a"
    images.mkdir(parents=True)
    for i in range(2000):  # about 2 s of embedding at batch 1: the signal comes after the first shard
        Image.new("RGB", (8, 8), (i % 256, i // 256, 0)).save(images / f"{i:04d}.png")
    out = tmp_path / "store"
    cmd = [*CLI, "embed-images", "--teacher", spec, "--images", str(images.parent), "--out", str(out),
           "--batch-size", "1", "--shard-size", "20", "--workers", "0", "--device", "cpu"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while not (out / "manifest.json").is_file() and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "interrupted (SIGTERM); re-run the same command to resume" in err, err[-800:]
    assert 0 < len(EmbeddingStore(out)) < 2000  # the finished shards are kept
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    assert r.returncode == 0 and len(EmbeddingStore(out)) == 2000, r.stderr[-800:]
    # the signal is not taken for an undecodable image (it once was, by the decoder's `except Exception`)
    assert EmbeddingStore(out).manifest["skipped_count"] == 0


def test_a_store_is_tied_to_its_images_by_content_where_sizes_are_equal(tmp_path):
    """Sizes cannot tell apart BMP (or PPM, raw TIFF) files of one size: a store of one folder of them used to be
    accepted for another folder with the same names — trained on the wrong embeddings, exit 0 — and embed-images
    into it embedded nothing. A content fingerprint of each file (first and last 4 KiB) now tells them apart."""
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        for i in range(12):
            (tmp_path / folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / folder / f"c{i % 2}" / f"{i}.bmp")
    a, b = tmp_path / "a", tmp_path / "b"
    assert {p.stat().st_size for p in a.rglob("*.bmp")} == {p.stat().st_size for p in b.rglob("*.bmp")}  # one size
    st = embed_images(FakeTeacher(), a, tmp_path / "store", workers=0, progress=False)
    paths = scan_image_folder(b).paths
    with pytest.raises(ClipkdError, match="differ in content from the files it embedded"):
        st.targets(paths, root=b)
    with pytest.raises(ClipkdError, match="holds embeddings of other files"):
        embed_images(FakeTeacher(), b, tmp_path / "store", workers=0, progress=False)
    import shutil

    shutil.copytree(a, tmp_path / "copy")  # the same images elsewhere: still the store's
    assert len(st.targets(paths, root=tmp_path / "copy").keep) == 12


def test_a_store_of_tsv_rows_is_tied_to_its_rows_by_content(tmp_path, tiny_world):
    """Chinese-CLIP TSV rows have no file size: a store of one TSV's rows was accepted for another TSV with the same
    image ids (a train TSV's store for the valid TSV) — rc 0, the other pictures' embeddings. Each row's
    fingerprint (its base64 text) is now recorded and compared."""
    import base64
    import shutil

    from clipkd.data.sources import open_source

    from .conftest import write_cnclip

    (tmp_path / "a").mkdir()
    tsv, _ = write_cnclip(tmp_path / "a", tiny_world)
    other = tmp_path / "b" / tsv.name  # the same ids, other pictures
    other.parent.mkdir()
    imgs = sorted((tiny_world / "val").rglob("*.png"))
    rows = [line.split("\t", 1)[0] for line in tsv.read_text().splitlines()]
    other.write_text("".join(f"{i}\t{base64.b64encode(imgs[n].read_bytes()).decode()}\n" for n, i in enumerate(rows)))
    st = embed_images(FakeTeacher(), tsv, tmp_path / "store", workers=0, progress=False)
    assert (st.prints() >= 0).sum() == 6  # the six decodable rows (the broken one is skipped)
    src = open_source(other)
    with pytest.raises(ClipkdError, match="differ in content from the files it embedded"):
        st.targets(src.keys, root=src.root, fingerprint=src.fingerprint)
    with pytest.raises(ClipkdError, match="holds embeddings of other files"):
        embed_images(FakeTeacher(), other, tmp_path / "store", workers=0, progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")  # the same TSV elsewhere: still the store's
    same = open_source(tmp_path / "copy" / tsv.name)
    assert len(st.targets(same.keys, root=same.root, fingerprint=same.fingerprint).keep) == 6
    assert len(embed_images(FakeTeacher(), tmp_path / "copy" / tsv.name, tmp_path / "store", workers=0,
                            progress=False)) == 6


def test_kill_9_during_index_add_keeps_the_served_generation_and_the_rerun_adds_each_image_once(tmp_path):
    """`clipkd index add` killed with SIGKILL part-way through embedding: the index still opens at its last
    generation with the same answers, and the same command run again adds every new image exactly once."""
    import re
    import threading

    from clipkd.search.index import SearchIndex
    from clipkd.search.writers import build_index
    from clipkd.teachers import load_clip

    spec = load_clip("open_clip:clipkd-micro").save(tmp_path / "teacher")
    root = tmp_path / "ix"
    build_index(spec, _folder(tmp_path / "base", 40), root, device="cpu", workers=0, progress=False)
    more = _folder(tmp_path / "more", 1500, seed=1)
    before = SearchIndex(root)
    want = before.search_vectors(np.asarray(before.store.embeddings()[:3], np.float32), 5)[1]
    cmd = [*CLI, "index", "add", "--index", str(root), "--images", str(more), "--batch-size", "1", "--workers", "0",
           "--device", "cpu"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    seen: list[str] = []

    def read() -> None:
        while chunk := p.stderr.read(64):
            seen.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 180
    while p.poll() is None and time.time() < deadline:
        if re.search(r"\| *([1-9]\d{2,})/1500", "".join(seen)):  # a few hundred embedded, far from the end
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert p.wait(timeout=60) == -signal.SIGKILL, "index add finished before it could be killed"
    reader.join(timeout=10)
    after = SearchIndex(root)
    assert after.generation == before.generation and len(after) == len(before) == 40
    assert (after.search_vectors(np.asarray(after.store.embeddings()[:3], np.float32), 5)[1] == want).all()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = SearchIndex(root)
    keys = [final.paths[int(r)] for r in final.rows]
    assert len(final) == 1540 and len(set(keys)) == 1540 and final.generation == before.generation + 1
    with exclusive(root, "search index"):  # a second writer of the same index: one line, nothing changed
        r = subprocess.run(cmd[:-6] + ["--workers", "0", "--device", "cpu"], capture_output=True, text=True,
                           env=_env(), timeout=300)
    assert r.returncode == 2 and "in use by another" in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr[-2000:]
    assert len(SearchIndex(root)) == 1540


def test_a_disk_that_fills_while_a_checkpoint_is_written_keeps_the_last_one_and_the_rerun_resumes(
        tmp_path, tiny_world, monkeypatch, capsys):
    """A full disk (ENOSPC) half-way through the third epoch's checkpoint: one line, exit non-zero, no partial file,
    the second epoch's last.ckpt intact; the same command then finishes from it."""
    import errno

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    real = TorchCheckpointIO.save_checkpoint
    calls = {"n": 0}

    def full_disk(self, checkpoint, path, storage_options=None):
        calls["n"] += 1
        if calls["n"] == 3 and Path(path).name.endswith(".partial"):
            Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full_disk)
    out = tmp_path / "run"
    args = ["train-supervised", "--images", str(tiny_world / "train"), "--split", str(tiny_world / "split.json"),
            "--out", str(out), "--epochs", "4", "--batch-size", "8", "--image-size", "32", "--workers", "0",
            "--device", "cpu"]
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "No space left" in err and len(err.splitlines()) == 1, err
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert not [n for n in ckpts if "partial" in n], ckpts
    assert _ckpt_epoch(out / "checkpoints" / "last.ckpt") == 1 and not (out / "student.pt").exists()
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", real)
    assert main(args) == 0 and (out / "student.pt").is_file()
