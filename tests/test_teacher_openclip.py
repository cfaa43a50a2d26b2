"""The open_clip backend, exercised the way a user loads a checkpoint: build, save, load by spec."""

import os
import re
import shutil

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import clipkd.teachers.openclip  # noqa: F401  (registers clipkd-tiny)
from clipkd.errors import ClipkdError
from clipkd.store import embed_images
from clipkd.teachers import load_teacher


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.create_model("clipkd-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "open_clip_model.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_spec_loads_local_checkpoint_and_matches_direct_model(tiny_ckpt):
    model, path = tiny_ckpt
    t = load_teacher(f"open_clip:clipkd-tiny@{path}", device="cpu")
    assert t.identity.startswith("open_clip:clipkd-tiny@open_clip_model.pt#")
    assert t.embed_dim == 128
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    x = t.preprocess(img).unsqueeze(0)
    with torch.no_grad():
        ref_img = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
        tokens = open_clip.get_tokenizer("clipkd-tiny")(["a red circle"])
        ref_txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    assert torch.allclose(t.encode_image(x), ref_img, atol=1e-5)
    assert torch.allclose(t.encode_text(["a red circle"]), ref_txt, atol=1e-5)
    assert t.describe()["preprocess"]["size"] == [32, 32]


def test_identity_changes_with_weights(tiny_ckpt, tmp_path):
    _, path = tiny_ckpt
    other = open_clip.create_model("clipkd-tiny")
    torch.save(other.state_dict(), tmp_path / "open_clip_model.pt")
    a = load_teacher(f"open_clip:clipkd-tiny@{path}", device="cpu").identity
    b = load_teacher(f"open_clip:clipkd-tiny@{tmp_path / 'open_clip_model.pt'}", device="cpu").identity
    assert a != b


def test_bad_specs_are_one_line_errors(tiny_ckpt, tmp_path):
    _, path = tiny_ckpt
    with pytest.raises(ClipkdError, match="does not fit open_clip model RN50"):
        load_teacher(f"open_clip:RN50@{path}", device="cpu")
    with pytest.raises(ClipkdError, match="checkpoint file not found"):
        load_teacher(f"open_clip:clipkd-tiny@{tmp_path / 'missing.pt'}", device="cpu")
    with pytest.raises(ClipkdError, match="unknown pretrained tag"):
        load_teacher("open_clip:ViT-B-32@not_a_tag", device="cpu")
    with pytest.raises(ClipkdError, match="has no model"):
        load_teacher("open_clip:ViT-Nope@x", device="cpu")
    with pytest.raises(ClipkdError, match="backend prefix"):
        load_teacher("ViT-B-32", device="cpu")
    for no_weights in ("open_clip:ViT-B-32", "open_clip:clipkd-tiny@"):  # would embed with random weights
        with pytest.raises(ClipkdError, match="names no weights.*@random"):
            load_teacher(no_weights, device="cpu")
    assert load_teacher("open_clip:clipkd-micro@random", device="cpu").identity.endswith("@random-init")
    with pytest.raises(ClipkdError, match="only supported on GPU"):
        load_teacher(f"open_clip:clipkd-tiny@{path}", device="cpu", precision="bf16")


def _tiny_folder(root, n=7):
    from tests.conftest import write_image

    for i in range(n):
        write_image(root / "c" / f"{i}.png", size=(40, 30), colour=(30 * i, 90, 200 - 20 * i))
    return root


@pytest.mark.skipif(not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile (inductor) needs a C++ compiler; the fallback test covers its absence")
def test_compiled_image_tower_matches_eager_and_pads_the_last_batch(tmp_path):
    t = load_teacher("open_clip:clipkd-micro@random", device="cpu")
    imgs = _tiny_folder(tmp_path / "imgs")
    eager = embed_images(t, imgs, tmp_path / "eager", batch_size=4, workers=0, progress=False, compile=False)
    assert not t.is_compiled  # off by default
    comp = embed_images(t, imgs, tmp_path / "comp", batch_size=4, workers=0, progress=False, compile=True)
    assert t.is_compiled  # still compiled after both batches (4 + 3 padded), checked against eager
    np.testing.assert_allclose(comp.embeddings(), eager.embeddings(), atol=1e-4)
    assert comp.paths == eager.paths


@pytest.mark.parametrize("fault", ["raises", "wrong"])
def test_compile_failure_falls_back_to_eager_with_a_warning(tmp_path, monkeypatch, caplog, fault):
    t = load_teacher("open_clip:clipkd-micro@random", device="cpu")
    imgs = _tiny_folder(tmp_path / "imgs")
    eager = embed_images(t, imgs, tmp_path / "eager", batch_size=4, workers=0, progress=False, compile=False)

    def broken(fn, **kw):
        def run(x):
            if fault == "raises":
                raise RuntimeError("no C++ compiler")
            return fn(x).flip(0)  # a miscompiled tower: right shape, wrong rows
        return run

    monkeypatch.setattr(torch, "compile", broken)
    match = "torch.compile failed.*no C.. compiler" if fault == "raises" else "disagrees with eager"
    comp = embed_images(t, imgs, tmp_path / "comp", batch_size=4, workers=0, progress=False, compile=True)
    assert any(r.levelname == "WARNING" and re.search(match, r.getMessage()) for r in caplog.records)
    assert not t.is_compiled
    np.testing.assert_allclose(comp.embeddings(), eager.embeddings(), atol=1e-6)
