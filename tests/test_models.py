"""The model layer and the image source: every kind of model through one pair of loaders, every input format through
one opener, and a guard that keeps the dispatch in those two rooms."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from clipkd.data.sources import open_source
from clipkd.errors import ClipkdError
from clipkd.models import ImageEncoder, TextEncoder, load_image_model, load_text_model, with_text
from clipkd.students.repnets import CONFIGS as REP_CONFIGS
from tests.conftest import write_image

SRC = Path(__file__).resolve().parents[1] / "src" / "clipkd"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A saved clipkd-micro CLIP (spec and a clip-train-style run folder), an embedding student of its space and a
    classifier student (random weights, saved as users' files are), the student exported to ONNX, and the CLIP's
    text tower exported."""
    from clipkd.export import export_model
    from clipkd.students.model import Student, StudentConfig, save_student
    from clipkd.teachers import load_clip

    root = tmp_path_factory.mktemp("models")
    spec = load_clip("open_clip:clipkd-micro").save(root / "clip")
    run = root / "clip-run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"spec": spec}))
    torch.manual_seed(0)
    clip = load_image_model(spec, device="cpu")
    emb = Student(StudentConfig("resnet10t", clip.embed_dim, image_size=32, teacher=clip.identity))
    save_student(root / "student" / "student.pt", emb)
    cls = Student(StudentConfig("resnet10t", 3, kind="classifier", image_size=32, classnames=["a", "b", "c"]))
    save_student(root / "classifier.pt", cls)
    imgs = root / "imgs"
    for i in range(4):
        write_image(imgs / f"x{i}.png", colour=(60 * i, 20, 200 - 40 * i))
    onnx = export_model(root / "student", root / "student.onnx", images=imgs, samples=4).path
    text = export_model(spec, root / "text.onnx", tower="text").path
    return {"spec": spec, "run": run, "student": root / "student", "pt": root / "student" / "student.pt",
            "classifier": root / "classifier.pt", "onnx": onnx, "text": text, "imgs": imgs}


def test_every_model_kind_loads_as_one_image_encoder(models):
    x = torch.rand(2, 3, 32, 32)
    seen = {}
    for name in ("spec", "run", "student", "pt", "onnx", "classifier"):
        m = load_image_model(models[name], device="cpu")
        assert isinstance(m, ImageEncoder)
        seen[name] = m
        size = m.preprocess_cfg.side
        e = m.encode_image(torch.rand(2, 3, size, size) if m.kind == "clip" else x)
        assert e.shape == (2, m.embed_dim)
        assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert seen["spec"].kind == seen["run"].kind == "clip" and seen["spec"].identity == seen["run"].identity
    assert seen["spec"].has_text and seen["spec"].space == seen["spec"].identity
    assert seen["student"].kind == seen["pt"].kind == seen["onnx"].kind == "student"
    assert seen["student"].identity == seen["pt"].identity  # a run folder names its student.pt
    assert seen["student"].space == seen["onnx"].space == seen["spec"].identity and not seen["student"].has_text
    assert seen["classifier"].kind == "classifier" and seen["classifier"].classnames == ["a", "b", "c"]
    # the ONNX student computes what its PyTorch original does
    a, b = seen["pt"].encode_image(x), seen["onnx"].encode_image(x)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999


def test_every_text_model_kind_embeds_alike_and_a_student_has_none(models):
    texts = ["a red circle", "一个绿色的三角形"]
    embs = []
    for name in ("spec", "run", "text"):
        t = load_text_model(models[name], device="cpu")
        assert isinstance(t, TextEncoder)
        embs.append(t.encode_text(texts))
    for e in embs[1:]:
        assert np.allclose(e.numpy(), embs[0].numpy(), atol=1e-4)
    for bad in ("student", "pt"):
        with pytest.raises(ClipkdError, match="is a distilled student: it has no text tower"):
            load_text_model(models[bad], device="cpu")
    with pytest.raises(ClipkdError, match="not an exported open_clip text tower"):
        load_text_model(models["onnx"], device="cpu")


def test_a_student_takes_only_its_own_teachers_text(models, tmp_path):
    from clipkd.teachers import load_clip

    s = with_text(load_image_model(models["onnx"], device="cpu"), models["text"], device="cpu")
    assert s.has_text and s.encode_text(["a red circle"]).shape == (1, s.embed_dim)
    other = load_clip("open_clip:clipkd-micro").save(tmp_path / "other")  # another random init: another space
    with pytest.raises(ClipkdError, match="its text would land in another space"):
        with_text(load_image_model(models["pt"], device="cpu"), other, device="cpu")
    with pytest.raises(ClipkdError, match="a CLIP with its own text tower"):
        with_text(load_image_model(models["spec"], device="cpu"), models["text"], device="cpu")


def test_open_source_reads_every_input_format(tmp_path, tiny_world):
    from clipkd.data.folders import clean_classname

    folder = open_source(tiny_world / "train")
    assert folder.kind == "folder" and len(folder) > 0 and all("/" in k for k in folder.keys)
    assert folder.labels == [clean_classname(k.split("/")[0]) for k in folder.keys]
    rows = [f"{tiny_world / 'train' / k},{lab}" for k, lab in zip(folder.keys[:5], folder.labels, strict=False)]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    listed = open_source(tmp_path / "list.csv")
    assert listed.kind == "list" and len(listed) == 5 and listed.labels == folder.labels[:5]
    assert all((listed.root / k).is_file() for k in listed.keys)
    import base64
    import io

    from PIL import Image

    rows = []
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(buf, format="JPEG")
        rows.append(f"{1000 + i}\t{base64.b64encode(buf.getvalue()).decode()}\n")
    (tmp_path / "valid_imgs.tsv").write_text("".join(rows))
    tsv = open_source(tmp_path / "valid_imgs.tsv")
    assert tsv.kind == "tsv" and tsv.keys == ["1000", "1001", "1002"] and tsv.opener("1002").size == (8, 8)
    with pytest.raises(ClipkdError, match=r"pool images not found: .*nowhere \(give a folder"):
        open_source(tmp_path / "nowhere", "pool images")


def test_model_dispatch_and_source_resolution_live_in_one_room_each():
    """Who decides "student or CLIP?" and "folder, list, shards or TSV?": only the model layer, the students and
    teachers rooms (for the first) and the data room (for the second). A new copy elsewhere fails here."""
    rules = {
        r"\bload_student\(": ("models.py", "students/", "training/build.py"),  # distill: --init from a student
        r"\bOnnxTextTower\(": ("teachers/",),
        r"\bis_tar_source\(|\bread_shards\(|\bread_image_list\(|\bis_cnclip_tsv\(": ("data/",),
        r"\bresolve_model\(": ("teachers/", "models.py"),
    }
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        text = path.read_text(encoding="utf-8")
        for pattern, allowed in rules.items():
            calls = [m for m in re.finditer(pattern, text)
                     if not text[max(0, m.start() - 4):m.start()].endswith("def ")]
            if calls and not rel.startswith(allowed):
                offenders.append(f"{rel}: {pattern}")
    assert offenders == []


def test_a_copied_clip_train_run_loads_its_own_weights(models, tmp_path):
    """run.json names the weights by absolute path; a copy of the folder must evaluate the copy, not the original."""
    import shutil

    from clipkd.teachers import load_clip, resolve_model

    spec = load_clip("open_clip:clipkd-micro").save(tmp_path / "orig")
    (tmp_path / "orig" / "run.json").write_text(json.dumps({"spec": spec}))
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    assert resolve_model(tmp_path / "copy") == spec.replace(str(tmp_path / "orig"), str((tmp_path / "copy").resolve()))
    x = torch.rand(1, 3, 32, 32)
    before = load_image_model(tmp_path / "copy", device="cpu").encode_image(x)
    load_clip("open_clip:clipkd-micro").save(tmp_path / "orig")  # the original overwritten by other weights
    after = load_image_model(tmp_path / "copy", device="cpu").encode_image(x)
    assert torch.allclose(before, after)


def test_the_api_chains_through_what_each_step_returns(tmp_path):
    """A training result, a store or a path: each step takes what the previous one returned."""
    from clipkd.fileio import ref
    from clipkd.store import EmbeddingStore
    from clipkd.training.distill import TrainResult

    clip_run = TrainResult(tmp_path / "clip", tmp_path / "clip" / "w.pt", spec="open_clip:clipkd-micro@/x/w.pt")
    student_run = TrainResult(tmp_path / "student", tmp_path / "student" / "student.pt")
    assert ref(clip_run) == "open_clip:clipkd-micro@/x/w.pt" and ref(student_run) == tmp_path / "student"
    store = EmbeddingStore.__new__(EmbeddingStore)
    store.root = tmp_path / "store"
    assert ref(store) == tmp_path / "store" and ref("open_clip:a@b") == "open_clip:a@b" and ref(None) is None


@pytest.mark.parametrize("arch", sorted(REP_CONFIGS))
def test_every_registered_rep_student_folds_exactly(arch):
    """Each clipkd_rep_* folds into one conv per block (stem + its stages' blocks), identity branches included (the
    second block of clipkd_rep_s's stage 2 is the one with an identity), with non-trivial BatchNorm statistics in
    every branch; the folded network gives the branched one's outputs."""
    import timm
    from timm.utils import reparameterize_model
    from torch import nn

    torch.manual_seed(0)
    m = timm.create_model(arch).eval()
    blocks = [b for b in m.modules() if type(b).__name__ == "RepVggBlock"]
    assert len(blocks) == 1 + sum(c.d for c in REP_CONFIGS[arch].blocks)
    idents = [b for b in blocks if b.identity is not None]
    assert len(idents) == (1 if arch == "clipkd_rep_s" else 0)
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.uniform_(-0.5, 0.5)
            b.running_var.uniform_(0.5, 2.0)
            b.weight.data.uniform_(0.5, 1.5)
            b.bias.data.uniform_(-0.2, 0.2)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want = m(x)
        folded = reparameterize_model(m)
        got = folded(x)
    assert not any(isinstance(b, nn.BatchNorm2d) for b in folded.modules())
    assert sum(isinstance(b, nn.Conv2d) for b in folded.modules()) == len(blocks)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_a_reparameterizable_student_folds_for_inference_with_the_same_outputs(models, tiny_world, tmp_path):
    """clipkd's RepVGG-style micro students train with branches and load folded: one conv per block, no BatchNorm,
    the same embeddings (and the same in its ONNX export); training from it again reads the branched form; 2:4
    sparsity (which folding would undo) is refused before any work."""
    from torch import nn

    import clipkd
    from clipkd.export import export_model
    from clipkd.students.model import Student, StudentConfig, load_student, save_student

    torch.manual_seed(0)
    s = Student(StudentConfig("clipkd_rep_xs", 16, image_size=32, teacher="fake:teacher@v1"))
    for m in s.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    s.eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        want = s(x)
    save_student(tmp_path / "rep" / "student.pt", s)
    folded = load_student(tmp_path / "rep")
    branched = load_student(tmp_path / "rep", reparameterize=False)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in branched.backbone.modules())
    # 3×3 and 1×1 branches of five stride-2 blocks, folded away
    assert n_bn == 10 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.backbone.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in folded.backbone.modules()) == 5  # stem + one block per stage
    with torch.no_grad():
        got = folded(x)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(branched(x), want)
    onnx = export_model(tmp_path / "rep", tmp_path / "rep.onnx", images=models["imgs"], samples=4)
    assert onnx.min_cosine >= 0.9999
    cfg = clipkd.TrainConfig(student="clipkd_rep_xs", sparsity="2:4")
    with pytest.raises(ClipkdError, match="folds its branches for inference"):
        clipkd.distill(tiny_world / "train", tmp_path / "sparse", cfg, teacher=models["spec"], device="cpu")
    assert not (tmp_path / "sparse").exists()


def test_image_costs_measure_several_models_side_by_side(models):
    """One row per model, in order, each with its size, FLOPs and both timings (the same as each model's own
    ``image_cost``); an impossible schedule is refused in one line."""
    from clipkd.models import image_cost, image_costs

    threads = torch.get_num_threads()
    clip, student = image_costs([models["spec"], models["student"]], repeats=10, rounds=2, threads=1)
    assert torch.get_num_threads() == threads  # the caller's setting restored
    for c in (clip, student):
        assert set(c) == {"image_params_m", "image_mflops", "cpu_ms_per_image", "cpu_ms_per_image_b64", "cpu_threads"}
        assert c["cpu_threads"] == 1
        assert c["cpu_ms_per_image"] > 0 and c["cpu_ms_per_image_b64"] > 0 and c["image_mflops"] > 0
    assert clip["image_params_m"] != student["image_params_m"]
    for m, c in ((models["spec"], clip), (models["student"], student)):
        one = image_cost(m, repeats=5)
        assert (one["image_params_m"], one["image_mflops"]) == (c["image_params_m"], c["image_mflops"])
    with pytest.raises(ClipkdError, match="repeats >= rounds"):
        image_costs([models["student"]], repeats=2, rounds=5)
    with pytest.raises(ClipkdError, match="threads must be at least 1"):
        image_costs([models["student"]], threads=0)
