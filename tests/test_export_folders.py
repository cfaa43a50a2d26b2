"""clipkd export --format timm|open_clip: folders that timm and open_clip load alone, checked in a Python where
clipkd cannot be imported, against clipkd's own outputs on the same images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import clipkd
from clipkd.errors import ClipkdError
from clipkd.export import export_model

NO_CLIPKD = "import sys; sys.modules['clipkd'] = None\n"  # `import clipkd` raises ImportError in the child


def _without_clipkd(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", NO_CLIPKD + code, *args], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
    from .conftest import FakeTeacher

    root = tmp_path_factory.mktemp("folders")
    teacher = FakeTeacher()
    store = clipkd.embed_images(teacher, tiny_world / "train", root / "store", progress=False)
    text = clipkd.embed_prompts(teacher, {c: [c] for c in clipkd.load_classnames(tiny_world / "train")})
    text.save(root / "text.npz")
    cfg = clipkd.TrainConfig(student="resnet10t", epochs=1, batch_size=8, workers=0, image_size=32)
    kw = dict(store=store.root, text=root / "text.npz", split=tiny_world / "split.json", device="cpu", progress=False)
    student = clipkd.distill(tiny_world / "train", root / "student", cfg, **kw)
    rep = clipkd.distill(tiny_world / "train", root / "rep", replace(cfg, student="clipkd_rep_xs"), **kw)
    result = clipkd.evaluate(str(student.out), tiny_world / "test", text=root / "text.npz",
                             split=tiny_world / "split.json", device="cpu", workers=0, progress=False)
    result.save(root / "eval.json")
    return root, student.out, rep.out


def _images(tiny_world: Path) -> list[str]:
    return sorted(str(p) for p in (tiny_world / "test").rglob("*.png"))[:6]


def _clipkd_embeddings(model: Path, files: list[str]) -> np.ndarray:
    from clipkd.data.images import load_rgb
    from clipkd.models import load_image_model

    m = load_image_model(model, device="cpu")
    with torch.no_grad():
        return m.forward(torch.stack([m.preprocess(load_rgb(f)) for f in files])).float().numpy()


TIMM_CHILD = """
import json, numpy as np, timm, torch
from PIL import Image
d, files = sys.argv[1], sys.argv[2:]
assert not [n for n in timm.list_models() if n.startswith('clipkd')]
m = timm.create_model('local-dir:' + d, pretrained=True).eval()
tf = timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))
with torch.no_grad():
    out = m(torch.stack([tf(Image.open(f).convert('RGB')) for f in files]))
from safetensors.torch import load_file
head = load_file(d + '/classifier.safetensors')
logits = head['logit_scale'] * torch.nn.functional.normalize(out, dim=-1) @ head['text_embeddings'].T
names = json.load(open(d + '/classifier.json'))['classnames']
print(json.dumps({'out': out.tolist(), 'top': [names[i] for i in logits.argmax(1).tolist()]}))
"""


def test_a_student_folder_loads_in_timm_without_clipkd(runs, tiny_world, tmp_path):
    root, student, _ = runs
    out = tmp_path / "student-timm"
    r = export_model(student, out, format="timm", text=root / "text.npz", results=root / "eval.json",
                     license="apache-2.0")
    assert r.format == "timm" and r.min_cosine >= 0.9999
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "resnet10t" and cfg["num_classes"] == 8
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["crop_pct"] == 1.0 and pc["interpolation"] == "bicubic"
    assert (out / "model.safetensors").is_file() and not (out / "model.onnx").exists()
    files = _images(tiny_world)
    child = json.loads(_without_clipkd(TIMM_CHILD, str(out), *files).stdout)
    want = _clipkd_embeddings(student, files)
    got = np.array(child["out"], np.float32)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, cos
    preds = clipkd.predict(str(student), files, text=root / "text.npz", device="cpu")
    assert child["top"] == [p.top[0][0] for p in preds]
    card = (out / "README.md").read_text()
    h = json.loads((root / "eval.json").read_text())["H"]
    assert "library_name: timm" in card and "license: apache-2.0" in card and "fake:teacher@v1" in card
    assert f"H {h:.4f}" in card and "ms per image" in card
    assert str(tmp_path) not in "".join(p.read_text(errors="ignore") for p in out.glob("*.json"))  # movable
    # exporting again replaces the folder (the marker says clipkd wrote it); a foreign folder is refused
    export_model(student, out, format="timm")
    assert not (out / "classifier.json").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ClipkdError, match="holds other files"):
        export_model(student, foreign, format="timm")
    (out / "my-notes.md").write_text("mine")  # a file added to an earlier export: replacing would delete it
    with pytest.raises(ClipkdError, match="1 file.* it did not write .*my-notes.md"):
        export_model(student, out, format="timm")
    assert (out / "my-notes.md").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_a_rep_student_folds_to_onnx_and_its_card_says_what_timm_needs(runs, tiny_world, tmp_path):
    _, _, rep = runs
    out = tmp_path / "rep-timm"
    r = export_model(rep, out, format="timm")
    assert r.metadata["onnx"] and (out / "model.onnx").is_file()
    assert "import clipkd.students.repnets" in (out / "README.md").read_text()
    files = _images(tiny_world)
    code = """
import json, numpy as np, onnxruntime as ort, timm, torch
from PIL import Image
d, files = sys.argv[1], sys.argv[2:]
cfg = json.load(open(d + '/config.json'))['pretrained_cfg']
tf = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg))
x = torch.stack([tf(Image.open(f).convert('RGB')) for f in files]).numpy()
s = ort.InferenceSession(d + '/model.onnx', providers=['CPUExecutionProvider'])
print(json.dumps(s.run(None, {s.get_inputs()[0].name: x})[0].tolist()))
"""
    got = np.array(json.loads(_without_clipkd(code, str(out), *files).stdout), np.float32)
    want = _clipkd_embeddings(rep, files)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, cos
    import timm

    import clipkd.students.repnets  # noqa: F401 - what the card says timm needs for the folder itself

    net = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    from clipkd.students.model import load_student

    with torch.no_grad():
        assert torch.allclose(net(x), load_student(rep)(x), atol=1e-4)


def test_a_clip_folder_loads_in_open_clip_without_clipkd(teacher_spec, tiny_world, tmp_path):
    from clipkd.data.images import load_rgb
    from clipkd.models import load_image_model

    out = tmp_path / "clip"
    r = export_model(teacher_spec, out, format="open_clip", images=tiny_world / "test")
    assert r.min_cosine >= 0.9999 and (out / "open_clip_model.safetensors").is_file()
    assert json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["width"] == 64
    files = _images(tiny_world)
    code = """
import json, open_clip, torch
from PIL import Image
d, files = sys.argv[1], sys.argv[2:]
assert 'clipkd-micro' not in open_clip.list_models()
m, _, tf = open_clip.create_model_and_transforms('local-dir:' + d)
tok = open_clip.get_tokenizer('local-dir:' + d)
m.eval()
with torch.no_grad():
    i = m.encode_image(torch.stack([tf(Image.open(f).convert('RGB')) for f in files]))
    t = m.encode_text(tok(['a photo of a dog', 'a red square']))
print(json.dumps({'image': i.tolist(), 'text': t.tolist()}))
"""
    child = json.loads(_without_clipkd(code, str(out), *files).stdout)
    m = load_image_model(teacher_spec, device="cpu")
    want_i = m.encode_image(torch.stack([m.preprocess(load_rgb(f)) for f in files])).numpy()
    want_t = m.encode_text(["a photo of a dog", "a red square"]).numpy()
    for got, want in ((child["image"], want_i), (child["text"], want_t)):
        got = np.array(got, np.float32)
        got /= np.linalg.norm(got, axis=1, keepdims=True)
        assert (got * want).sum(1).min() >= 0.9999


def test_folder_exports_refuse_what_they_cannot_write(runs, teacher_spec, tiny_world, tmp_path):
    root, student, _ = runs
    with pytest.raises(ClipkdError, match="clip-train run goes to `format`=open_clip"):
        export_model(teacher_spec, tmp_path / "a", format="timm", images=tiny_world / "test")
    with pytest.raises(ClipkdError, match="a student goes to `format`=timm"):
        export_model(student, tmp_path / "b", format="open_clip")
    with pytest.raises(ClipkdError, match="`text` goes with a folder export"):
        export_model(student, tmp_path / "c.onnx", text=root / "text.npz")
    (root / "other.json").write_text('{"a": 1}')
    with pytest.raises(ClipkdError, match="not a `clipkd eval` result"):
        export_model(student, tmp_path / "d", format="timm", results=root / "other.json")
    with pytest.raises(ClipkdError, match="not a repository name"):
        export_model(student, tmp_path / "e", format="timm", push_to_hub="no-owner")
    assert not [p for p in tmp_path.iterdir() if p.name != "e"]  # nothing half-written


class _Hub(BaseHTTPRequestHandler):
    """The Hugging Face Hub's upload routes, answered on loopback, each request recorded."""

    seen: list[tuple[str, str, bytes]] = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append(("POST", self.path, body))
        if self.path == "/api/repos/create":
            self._reply({"url": f"http://{self.headers['Host']}/me/student", "name": "me/student"})
        elif self.path == "/api/validate-yaml":  # the model card's front matter, checked before the upload
            self._reply({"warnings": [], "errors": []})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]})
        elif "/commit/" in self.path:
            self._reply({"commitUrl": f"http://{self.headers['Host']}/me/student/commit/abc", "commitOid": "a" * 40,
                         "pullRequestUrl": None})
        else:
            self.send_error(404)

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(("GET", self.path, b""))
        self.send_error(404)

    def log_message(self, *a) -> None:
        pass


def test_push_to_hub_uploads_every_file_of_the_folder(runs, tmp_path):
    _, student, _ = runs
    out = tmp_path / "student-timm"
    export_model(student, out, format="timm")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_TOKEN="hf_" + "x" * 30,
                   HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1")
        code = "from clipkd.export.folder import push_folder; print(push_folder(sys.argv[1], 'me/student'))"
        r = subprocess.run([sys.executable, "-c", "import sys\n" + code, str(out)], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "/me/student/commit/abc" in r.stdout
    finally:
        server.shutdown()
    posts = {p for m, p, _ in _Hub.seen if m == "POST"}
    assert "/api/repos/create" in posts and any("/commit/" in p for p in posts)
    commit = b"".join(b for _, p, b in _Hub.seen if "/commit/" in p).decode()
    sent = {json.loads(line)["value"]["path"] for line in commit.splitlines() if '"file"' in line}
    assert sent == {p.name for p in out.iterdir()}, sent
