"""clipkd export: ONNX files that describe themselves, agree with PyTorch, and evaluate like their originals."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

import clipkd
from clipkd.cli import main
from clipkd.errors import ClipkdError
from clipkd.export import export_model
from clipkd.students.onnx import read_metadata


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
    from .conftest import FakeTeacher

    root = tmp_path_factory.mktemp("export")
    teacher = FakeTeacher()
    store = clipkd.embed_images(teacher, tiny_world / "train", root / "store", progress=False)
    text = clipkd.embed_prompts(teacher, {c: [c] for c in clipkd.load_classnames(tiny_world / "train")})
    text.save(root / "text.npz")
    cfg = clipkd.TrainConfig(student="resnet10t", epochs=2, batch_size=8, workers=0, image_size=32)
    student = clipkd.distill(tiny_world / "train", root / "student", cfg, store=store.root, text=root / "text.npz",
                             split=tiny_world / "split.json", device="cpu", progress=False)
    sup = clipkd.train_supervised(tiny_world / "train", root / "supervised", replace(cfg, epochs=1),
                                  split=tiny_world / "split.json", device="cpu", progress=False)
    return root, student.out, sup.out


def _eval(model, tiny_world, root):
    return clipkd.evaluate(str(model), tiny_world / "test", text=root / "text.npz", split=tiny_world / "split.json",
                           device="cpu", workers=0, progress=False)


def test_student_onnx_describes_itself_and_evaluates_like_pytorch(runs, tiny_world, tmp_path):
    root, student, _ = runs
    r = export_model(student, tmp_path / "s.onnx")  # parity samples: the run's training images
    assert r.min_cosine >= 0.9999 and r.samples > 0
    m = onnx.load(str(r.path))
    onnx.checker.check_model(m)
    assert m.opset_import[0].version == 18
    meta = read_metadata(r.path)
    assert meta["kind"] == "embedding" and meta["teacher"] == "fake:teacher@v1"
    assert meta["preprocess"]["size"] == [32, 32] and meta["preprocess"]["interpolation"] == "bicubic"
    assert meta["preprocess"]["mean"] == [0, 0, 0]  # the student normalises as its (fake) teacher does
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert not dims[0].dim_value and [d.dim_value for d in dims[1:]] == [3, 32, 32]  # dynamic batch
    a, b = _eval(student, tiny_world, root), _eval(r.path, tiny_world, root)
    assert (a.S, a.U, a.H, a.top1) == pytest.approx((b.S, b.U, b.H, b.top1), abs=1e-6)


def test_int8_export_keeps_accuracy_on_the_tiny_world(runs, tiny_world, tmp_path):
    root, student, _ = runs
    r = export_model(student, tmp_path / "s8.onnx", int8=True, calib=tiny_world / "train")
    meta = read_metadata(r.path)
    assert meta["precision"] == "int8" and meta["quantization"]["format"] == "QDQ"
    ops = {n.op_type for n in onnx.load(str(r.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    fp32 = export_model(student, tmp_path / "s.onnx")
    assert r.size_bytes < 0.5 * fp32.size_bytes
    a, b = _eval(student, tiny_world, root), _eval(r.path, tiny_world, root)
    assert abs(a.top1 - b.top1) <= 0.1 and r.mean_cosine > 0.98, (a, b, r)


def test_classifier_and_clip_tower_exports(runs, tiny_world, tmp_path):
    import open_clip

    import clipkd.teachers.openclip  # noqa: F401 - registers clipkd-tiny

    _, _, sup = runs
    r = export_model(sup, tmp_path / "sup.onnx")
    assert read_metadata(r.path)["kind"] == "classifier" and read_metadata(r.path)["classnames"]
    torch.manual_seed(0)
    torch.save(open_clip.create_model("clipkd-tiny").state_dict(), tmp_path / "open_clip_model.pt")
    spec = f"open_clip:clipkd-tiny@{tmp_path / 'open_clip_model.pt'}"
    r = export_model(spec, tmp_path / "tower.onnx", images=tiny_world / "val")
    teacher = clipkd.load_teacher(spec, device="cpu")
    meta = read_metadata(r.path)
    assert meta["teacher"] == teacher.identity and meta["out_dim"] == teacher.embed_dim and r.min_cosine > 0.9999
    # the exported tower embeds like the teacher (an index or eval built on it lands in the teacher's space)
    from clipkd.students.model import load_student

    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(torch.nn.functional.normalize(load_student(r.path)(x), dim=-1), teacher.encode_image(x),
                          atol=1e-4)


def test_an_open_clip_vit_tower_exports_with_a_dynamic_batch_fp32_and_int8(tiny_world, tmp_path):
    """The seed's teachers are open_clip ViTs: their exported image tower takes a batch of 1 and of 3 (a batch of one
    as the export's example used to fix the axis at 1, and the 16-sample parity check then failed in ONNX
    Runtime), in fp32 and INT8. A ViT as small as open_clip builds, so that the test is quick."""
    import onnxruntime as ort
    import open_clip

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "test-vit-micro.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfg")
    spec = "open_clip:test-vit-micro@random"
    fp32 = export_model(spec, tmp_path / "vit.onnx", images=tiny_world / "val", samples=3)
    int8 = export_model(spec, tmp_path / "vit8.onnx", images=tiny_world / "val", samples=3, int8=True,
                        calib=tiny_world / "train", calib_count=32)
    assert fp32.min_cosine > 0.9999 and int8.min_cosine > 0.9 and read_metadata(int8.path)["precision"] == "int8"
    for r in (fp32, int8):
        session = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"])
        dim = session.get_inputs()[0].shape[0]
        assert isinstance(dim, str), dim  # symbolic, not a number
        for batch in (1, 3):
            out = session.run(None, {"image": np.random.default_rng(batch).random((batch, 3, 32, 32), np.float32)})
            assert out[0].shape == (batch, 32)


def _one_line(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err, err


def test_export_bad_input_is_one_line_and_leaves_nothing(runs, tiny_world, tmp_path, capsys):
    root, student, _ = runs
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    out = tmp_path / "x.onnx"
    _one_line(capsys, ["export", "--model", str(tmp_path / "other.pt"), "--out", str(out),
                       "--images", str(tiny_world / "val")], "not a clipkd student checkpoint")
    _one_line(capsys, ["export", "--model", str(student), "--out", str(out), "--format", "tflite"],
              "unknown export format")
    (tmp_path / "few").mkdir()
    for i, f in enumerate(sorted((tiny_world / "val").rglob("*.png"))[:5]):
        (tmp_path / "few" / f"{i}.png").write_bytes(f.read_bytes())
    _one_line(capsys, ["export", "--model", str(student), "--out", str(out), "--int8", "--calib",
                       str(tmp_path / "few")], "needs at least 16")
    _one_line(capsys, ["export", "--model", str(student), "--out", str(out), "--format", "tensorrt"]
              if not torch.cuda.is_available() else ["export", "--model", str(student), "--out", str(tmp_path)],
              "needs a CUDA GPU" if not torch.cuda.is_available() else "is a folder")
    _one_line(capsys, ["export", "--model", str(student), "--out", str(tmp_path / "x.onnx.tmp")], "must end in .onnx")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # an ONNX file without clipkd's metadata: refused by every consumer, in one line
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),), str(tmp_path / "bare.onnx"), dynamo=False)
    _one_line(capsys, ["eval", "--model", str(tmp_path / "bare.onnx"), "--images", str(tiny_world / "test"),
                       "--text", str(root / "text.npz")], "no clipkd metadata")


def test_parity_failure_is_an_error_and_writes_nothing(runs, tmp_path, monkeypatch):
    _, student, _ = runs
    import clipkd.export.onnx as ex

    real = ex._parity
    monkeypatch.setattr(ex, "_parity", lambda path, ref, x: (0.99, 0.995) if path.exists() else real(path, ref, x))
    with pytest.raises(ClipkdError, match="disagrees with PyTorch"):
        export_model(student, tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()


def test_export_cli_prints_parity(runs, tmp_path, capsys):
    _, student, _ = runs
    assert main(["export", "--model", str(student), "--out", str(tmp_path / "s.onnx")]) == 0
    out = capsys.readouterr().out
    assert "cosine to PyTorch" in out and (tmp_path / "s.onnx").is_file()
    assert json.loads(onnx.load(str(tmp_path / "s.onnx")).metadata_props[0].value)["format"] == "clipkd-onnx/1"
    assert np.isfinite(float(out.split("min ")[1].split(",")[0]))


def test_two_four_fine_tune_keeps_the_pattern_into_the_onnx_file(runs, tiny_world, tmp_path):
    from onnx import numpy_helper

    from clipkd.students.model import load_student
    from clipkd.students.sparsity import is_two_four, prunable, two_four_mask

    w = torch.tensor([[0.1, -3.0, 0.2, 2.0, 5.0, 0.0, -0.3, 0.4]])
    assert two_four_mask(w).tolist() == [[False, True, False, True, True, False, False, True]]  # by hand
    root, student, _ = runs
    cfg = clipkd.TrainConfig(student="resnet10t", epochs=1, batch_size=8, workers=0, image_size=32,
                             init=str(student), sparsity="2:4")
    r = clipkd.distill(tiny_world / "train", tmp_path / "sparse", cfg, store=root / "store", text=root / "text.npz",
                       split=tiny_world / "split.json", device="cpu", progress=False)
    report = json.loads((r.out / "run.json").read_text())["sparsity"]
    assert report["two_four"] and 0.49 < report["zero_share_of_pruned"] <= 0.6 and report["layers"] > 5
    net = load_student(r.out)
    assert all(is_two_four(m.weight) for _, m in prunable(net))
    assert not is_two_four(next(m for _, m in prunable(load_student(student))).weight)  # the dense original
    e = export_model(r.out, tmp_path / "sparse.onnx")
    assert read_metadata(e.path)["sparsity"] == "2:4"
    m = onnx.load(str(e.path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    checked = 0
    for node in m.graph.node:
        if node.op_type == "Conv" and node.input[1] in inits:
            k = inits[node.input[1]]
            if k.shape[1] % 4 == 0:
                groups = (np.transpose(k, (0, 2, 3, 1)).reshape(-1, 4) != 0).sum(-1)
                assert (groups <= 2).all(), node.name
                checked += 1
    assert checked >= 5
    with pytest.raises(ClipkdError, match="`init`"):
        clipkd.distill(tiny_world / "train", tmp_path / "bad", replace(cfg, student="resnet18"), store=root / "store",
                       device="cpu", progress=False)
    with pytest.raises(ClipkdError, match="`sparsity`"):
        clipkd.distill(tiny_world / "train", tmp_path / "bad", replace(cfg, sparsity="1:2"), store=root / "store",
                       device="cpu", progress=False)


def test_predict_video_gives_top_k_per_frame_with_fps(runs, tiny_world, tmp_path, capsys):
    import cv2
    from PIL import Image

    root, student, _ = runs
    frames = sorted((tiny_world / "test").rglob("*.png"))[:12]
    writer = cv2.VideoWriter(str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    for f in frames:
        rgb = np.asarray(Image.open(f).convert("RGB").resize((32, 32)))
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    onnx_student = export_model(student, tmp_path / "s.onnx").path
    for model in (student, onnx_student):  # the deployed model too
        assert main(["predict", "--model", str(model), "--text", str(root / "text.npz"), "--video",
                     str(tmp_path / "clip.avi"), "--topk", "2", "--every", "2"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert [ln.split(":")[0] for ln in lines[:-1]] == [f"frame {i}" for i in range(0, 12, 2)]
        classes = set(clipkd.TextEmbeddings.load(root / "text.npz").classnames)
        assert all(ln.split(": ")[1].split(" ")[0] in {c.split(" ")[0] for c in classes} for ln in lines[:-1])
        assert lines[-1].startswith("6 frames,") and float(lines[-1].split(", ")[1].split(" ")[0]) > 0
    _one_line(capsys, ["predict", "--model", str(student), "--text", str(root / "text.npz"), "--video",
                       str(tmp_path / "missing.mp4")], "video file not found")
    (tmp_path / "bad.avi").write_bytes(b"not a video")
    _one_line(capsys, ["predict", "--model", str(student), "--text", str(root / "text.npz"), "--video",
                       str(tmp_path / "bad.avi")], "cannot open video")
    _one_line(capsys, ["predict", "--model", str(student), "--text", str(root / "text.npz")], "--video")


def test_search_index_built_and_queried_with_an_onnx_student(runs, tiny_world, tmp_path):
    from clipkd.search.writers import build_index

    _, student, _ = runs
    path = export_model(student, tmp_path / "s.onnx", int8=True, calib=tiny_world / "train").path
    index = build_index(path, tiny_world / "val", tmp_path / "index", device="cpu", workers=0, progress=False)
    query = sorted((tiny_world / "val").rglob("*.png"))[0]
    hits = index.search(image=query, k=3)
    # INT8 can tie the query with a near-identical image of its class (both score ~1.0): the query itself is among
    # the hits, and the best hit is of its class
    own = [h for h in hits if h["path"].endswith(f"{query.parent.name}/{query.name}")]
    assert len(hits) == 3 and own and own[0]["score"] > 0.99, hits
    assert hits[0]["path"].split("/")[-2] == query.parent.name and hits[0]["score"] > 0.99, hits
    for f in (tmp_path / "index").rglob("*"):  # the student's run folder (the runs fixture's) is not named
        assert not f.is_file() or str(tmp_path.parent).encode() not in f.read_bytes(), f


def test_eval_retrieval_of_an_exported_image_tower(runs, tiny_world, tmp_path):
    from clipkd.evaluation.retrieval import evaluate_retrieval

    _, student, _ = runs
    path = export_model(student, tmp_path / "s.onnx").path
    a = evaluate_retrieval(student, tiny_world / "test", device="cpu", workers=0, progress=False)
    b = evaluate_retrieval(path, tiny_world / "test", device="cpu", workers=0, progress=False)
    assert a.metrics["i2i_map@10"] == pytest.approx(b.metrics["i2i_map@10"], abs=1e-6) and a.n_images == b.n_images
    with pytest.raises(ClipkdError, match="text tower"):
        evaluate_retrieval(path, tiny_world / "test", captions=tiny_world / "test" / "captions_en.csv", device="cpu")


def test_qat_fine_tune_writes_an_int8_onnx_that_evaluates(runs, tiny_world, tmp_path):
    root, student, _ = runs
    cfg = clipkd.TrainConfig(student="resnet10t", epochs=1, batch_size=8, workers=0, image_size=32,
                             init=str(student), qat=True, lr=2e-4)
    r = clipkd.distill(tiny_world / "train", tmp_path / "qat", cfg, store=root / "store", text=root / "text.npz",
                       split=tiny_world / "split.json", device="cpu", progress=False)
    assert r.path.name == "student.int8.onnx" and not (r.out / "student.pt").exists()
    meta = read_metadata(r.path)
    assert meta["precision"] == "int8" and meta["quantization"]["method"] == "qat"
    ops = {n.op_type for n in onnx.load(str(r.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops  # folded
    assert json.loads((r.out / "run.json").read_text())["qat"]["min_cosine_onnx_vs_pytorch"] >= 0.999
    a, b = _eval(student, tiny_world, root), _eval(r.path, tiny_world, root)
    assert abs(a.top1 - b.top1) <= 0.15, (a, b)
    with pytest.raises(ClipkdError, match="`init`"):
        clipkd.distill(tiny_world / "train", tmp_path / "bad", replace(cfg, init=""), store=root / "store",
                       device="cpu", progress=False)


def test_text_tower_export_serves_embed_text_and_student_text_search(tiny_world, tmp_path, capsys):
    from clipkd.search.writers import build_index
    from clipkd.students.onnx import OnnxTextTower
    from clipkd.teachers import load_clip, load_teacher

    spec = load_clip("open_clip:clipkd-micro").save(tmp_path / "clip")
    assert main(["export", "--model", spec, "--tower", "text", "--out", str(tmp_path / "text.onnx")]) == 0
    assert "cosine to PyTorch on 16 sample texts min 1.0000" in capsys.readouterr().out
    meta = read_metadata(tmp_path / "text.onnx")
    assert meta["kind"] == "text_embedding" and meta["tokenizer"] == {"backend": "open_clip", "model": "clipkd-micro",
                                                                      "context_length": 24, "embedded": True}
    clip = load_teacher(spec, device="cpu")
    tower = OnnxTextTower(tmp_path / "text.onnx")
    texts = ["a red circle", "a photo of a blue square", "一个绿色的三角形"]
    assert torch.nn.functional.cosine_similarity(tower.encode_text(texts), clip.encode_text(texts)).min() > 0.9999
    classes = tiny_world / "train"
    a = clipkd.embed_text(spec, classes=classes, templates="simple", device="cpu")
    b = clipkd.embed_text(str(tmp_path / "text.onnx"), classes=classes, templates="simple", device="cpu")
    assert a.teacher == b.teacher and np.allclose(a.embeddings, b.embeddings, atol=1e-4)
    b.save(tmp_path / "t.npz")
    # a deployed student + the exported text tower: text search with no PyTorch CLIP
    store = clipkd.embed_images(clip, tiny_world / "train", tmp_path / "store", progress=False, workers=0)
    cfg = clipkd.TrainConfig(student="resnet10t", epochs=1, batch_size=8, workers=0, image_size=32)
    student = clipkd.distill(tiny_world / "train", tmp_path / "student", cfg, store=store.root,
                             split=tiny_world / "split.json", device="cpu", progress=False)
    onnx_student = export_model(student.out, tmp_path / "s.onnx").path
    index = build_index(onnx_student, tiny_world / "val", tmp_path / "index", text_model=tmp_path / "text.onnx",
                        device="cpu", workers=0, progress=False)
    hits = index.search(text="a red circle", k=3)
    written = [f for f in (tmp_path / "index").rglob("*") if f.is_file()]
    assert any(f.suffix == ".onnx" for f in written)
    for f in written:  # an index names no folder of the machine that built it, its models' metadata included
        assert str(tmp_path).encode() not in f.read_bytes(), f
    ref = build_index(onnx_student, tiny_world / "val", tmp_path / "index-pt", text_model=spec, device="cpu",
                      workers=0, progress=False).search(text="a red circle", k=3)
    assert [h["path"] for h in hits] == [h["path"] for h in ref]
    assert index.encoder.runtime == "torch"  # built through the model layer; queried below without PyTorch
    _lean_server_answers_like_the_pytorch_one(tmp_path / "index", tiny_world, ref, capsys)
    for argv, needle in ((["export", "--model", str(student.out), "--tower", "text", "--out", str(tmp_path / "x.onnx")],
                          "has no text tower"),
                         (["eval", "--model", str(tmp_path / "text.onnx"), "--images", str(tiny_world / "test"),
                           "--text", str(tmp_path / "t.npz"), "--device", "cpu"], "exported text tower")):
        assert main(argv) == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


LEAN_CHECK = """
import base64, json, sys
heavy = ("torch", "torchvision", "lightning", "pytorch_lightning", "open_clip", "timm", "transformers")
for name in heavy:  # as on a machine without them: importing any of these now fails
    sys.modules[name] = None
from fastapi.testclient import TestClient
from clipkd.cli import main
from clipkd.search.service import create_app

index, query = sys.argv[1], sys.argv[2]
client = TestClient(create_app(index, public_url="http://search.test"))
image = base64.b64encode(open(query, "rb").read()).decode()
out = {"text": client.post("/search", json={"text": "a red circle", "k": 3}).json(),
       "knn": client.post("/knn-service", json={"image": image, "num_images": 2, "deduplicate": False}).json(),
       "health": {k: v for k, v in client.get("/health").json().items() if k != "worker"}}  # its process id
print("CLI", main(["search", "--index", index, "--text", "a red circle", "--k", "3"]), file=sys.stderr)
out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in heavy and sys.modules[m] is not None)
print(json.dumps(out))
"""


def test_a_real_install_without_pytorch_answers_as_the_hidden_modules_run_does(tiny_world, tmp_path):
    """`pip install ".[serve]"` (no PyTorch at all: `make test` builds it in .venv-lean and names its python in
    CLIPKD_LEAN_PYTHON) serves an index of exported towers with the same answers as this environment with the heavy
    modules hidden. Skipped, saying why, where that environment is not given; a failure under CI, which runs
    `make test`."""
    import subprocess
    import sys

    from clipkd.search.writers import build_index
    from clipkd.teachers import load_clip

    lean = os.environ.get("CLIPKD_LEAN_PYTHON")
    if not lean:
        if os.environ.get("CI"):
            pytest.fail("CI must run the lean-install check: run `make test` (it sets CLIPKD_LEAN_PYTHON)")
        pytest.skip("CLIPKD_LEAN_PYTHON is not set (`make test` sets it to .venv-lean/bin/python, an install of "
                    "clipkd[serve] without PyTorch)")
    assert subprocess.run([lean, "-c", "import torch"], capture_output=True).returncode != 0
    spec = load_clip("open_clip:clipkd-micro").save(tmp_path / "clip")
    for tower in ("image", "text"):
        assert main(["export", "--model", spec, *(["--tower", "text"] if tower == "text" else
                                                  ["--images", str(tiny_world / "val")]),
                     "--out", str(tmp_path / f"{tower}.onnx")]) == 0
    build_index(tmp_path / "image.onnx", tiny_world / "val", tmp_path / "index", text_model=tmp_path / "text.onnx",
                device="cpu", workers=0, progress=False)
    query = sorted((tiny_world / "val").rglob("*.png"))[0]
    answers = []
    for python in (sys.executable, lean):
        run = subprocess.run([python, "-c", LEAN_CHECK, str(tmp_path / "index"), str(query)], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, (python, run.stderr[-2000:])
        answers.append(json.loads(run.stdout.strip().splitlines()[-1]))
    assert answers[0]["text"]["results"] and answers[0]["imported"] == [] and answers[1] == answers[0]


def _lean_server_answers_like_the_pytorch_one(index_dir, tiny_world, ref, capsys):
    """An index built with an exported student and text tower is served, and searched from the CLI, in a process
    where torch, Lightning, open_clip and timm cannot be imported, with the PyTorch path's answers; a text tower
    exported without its tokenizer is queried through PyTorch instead."""
    import subprocess
    import sys

    from clipkd.search.index import SearchIndex

    query = sorted((tiny_world / "val").rglob("*.png"))[0]
    proc = subprocess.run([sys.executable, "-c", LEAN_CHECK, str(index_dir), str(query)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["imported"] == [], got["imported"]
    assert got["health"]["runtime"] == "onnx" and got["health"]["text"] is True
    assert [h["id"] for h in got["text"]["results"]] == [h["id"] for h in ref]
    assert [h["score"] for h in got["text"]["results"]] == pytest.approx([h["score"] for h in ref], abs=1e-5)
    torch_index = SearchIndex(index_dir)
    from clipkd.search.encoder import load_encoder

    torch_index.encoder = load_encoder(torch_index.model, torch_index.text_model, "cpu")
    want = torch_index.search(image=query, k=2)
    assert [h["id"] for h in got["knn"]] == [h["id"] for h in want]
    assert [h["similarity"] for h in got["knn"]] == pytest.approx([h["score"] for h in want], abs=1e-5)
    assert "CLI 0" in proc.stderr and str(ref[0]["path"]) in proc.stdout
    old = onnx.load(str(torch_index.text_model))  # as exported before the tokenizer was embedded
    kept = [p for p in old.metadata_props if p.key != "clipkd.tokenizer"]
    del old.metadata_props[:]
    old.metadata_props.extend(kept)
    onnx.save(old, str(index_dir.parent / "old-text.onnx"))
    enc = SearchIndex(index_dir).load_encoder(text_model=index_dir.parent / "old-text.onnx", device="cpu")
    assert enc.runtime == "torch" and enc.identity == got["health"]["model"]
    assert np.allclose(enc.encode_text(["a red circle"]).numpy(), torch_index.embed_text(["a red circle"]), atol=1e-5)
    with pytest.raises(ClipkdError, match="ONNX file not found: .*gone.onnx"):  # not a detour through PyTorch
        SearchIndex(index_dir).load_encoder(model=index_dir.parent / "gone.onnx", device="cpu")



def test_text_tower_runs_only_up_to_the_longest_end_token(tmp_path):
    """A causal text tower cut after the longest query's end token gives the full tower's embeddings (the demo
    world's prompts in English and Chinese, alone and in batches), in PyTorch and from the ONNX export, whose
    sequence axis is dynamic; a file with a fixed axis (older exports) still runs the whole context."""
    import torch.nn.functional as F

    from clipkd.data.synth import COLOURS, SHAPES
    from clipkd.deployed import DeployedText
    from clipkd.prompts import builtin_templates
    from clipkd.teachers import load_clip

    clip = load_clip("open_clip:clipkd-micro")
    spec = clip.save(tmp_path / "clip")
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    chinese = [f"一张{zh}{zs}的照片。" for (_, zh), zs in zip(COLOURS.values(), SHAPES.values(), strict=True)]
    texts = [t.format(n) for n in names[::7] for t in builtin_templates("simple")] + chinese + ["星形", "a"]
    tokens = clip.tokenizer(texts)
    with torch.no_grad():
        full = F.normalize(clip.model.encode_text(tokens), dim=-1)  # open_clip's own forward, every position
        assert F.cosine_similarity(F.normalize(clip.text_features(tokens), dim=-1), full).min() >= 0.9999
        short = clip.tokenizer(["a red circle"])
        assert F.cosine_similarity(clip.text_features(short), clip.model.encode_text(short)).min() >= 0.9999
    export_model(spec, tmp_path / "text.onnx", tower="text")
    assert read_metadata(tmp_path / "text.onnx")["input_shape"] == ["batch", "seq"]
    tower = DeployedText(tmp_path / "text.onnx")
    context = tokens.shape[1]
    assert tower.cut and tower.tokens(["a red circle"]).shape[1] == 5 < context  # start, three words, end
    for batch in (texts, texts[:1], texts[-2:], ["一张红色圆形的照片。"]):
        ref = full[[texts.index(t) for t in batch]] if batch[0] in texts else None
        got = torch.from_numpy(tower.encode_text_np(batch))
        if ref is None:
            with torch.no_grad():
                ref = F.normalize(clip.model.encode_text(clip.tokenizer(batch)), dim=-1)
        assert F.cosine_similarity(got, ref).min() >= 0.9999
    tower.cut = False  # as a file whose sequence axis is fixed: the whole context, the same embeddings
    assert tower.tokens(["a red circle"]).shape[1] == context
    assert F.cosine_similarity(torch.from_numpy(tower.encode_text_np(texts)), full).min() >= 0.9999
