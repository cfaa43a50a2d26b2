"""Shared fixtures. Tests run offline: any attempt to open a network connection fails loudly."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms as T

# the model layer binds clipkd.teachers.load_teacher when first imported: import it before any test patches that
# name, or a patched stand-in would stay bound for every later test (an order-dependent failure)
import clipkd.models  # noqa: E402, F401

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


class NetworkBlocked(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail any test that tries to reach the network (local sockets are allowed)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and self.family != socket.AF_UNIX:
            raise NetworkBlocked(f"test tried to reach the network: {address}")
        return real_connect(self, address)

    real_getaddrinfo = socket.getaddrinfo

    def resolve(host, *a, **k):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise NetworkBlocked(f"test tried to resolve {host}")
        return real_getaddrinfo(host, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)


class FakeTeacher:
    """A cheap deterministic 'teacher': embeds an image as a fixed projection of its mean colour and size."""

    def __init__(self, identity: str = "fake:teacher@v1", dim: int = 8) -> None:
        from clipkd.teachers.base import Teacher

        self.identity, self.embed_dim = identity, dim
        self.preprocess = T.Compose([T.Resize((16, 16)), T.ToTensor()])
        from clipkd.data.preprocess import PreprocessConfig

        self.preprocess_cfg = PreprocessConfig(size=(16, 16), mean=(0, 0, 0), std=(1, 1, 1), resize_mode="squash",
                                               crop=False)
        self.logit_scale = 10.0
        self.device = torch.device("cpu")
        self.model = torch.nn.Identity()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(6, dim, generator=g)
        self.describe = lambda: Teacher.describe(self)
        self.calls = 0

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += len(images)
        feats = torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)
        return torch.nn.functional.normalize(feats @ self.proj, dim=-1)

    def encode_text(self, texts):
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(map(ord, t)))
            out.append(torch.randn(self.embed_dim, generator=g))
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)


@pytest.fixture
def fake_teacher() -> FakeTeacher:
    return FakeTeacher()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A 4 colours × 4 shapes world with few images (seconds to make)."""
    from clipkd.data.synth import WorldConfig, synthesize

    cfg = WorldConfig(n_shapes=4, n_colours=4, unseen_per_shape=1, train_per_class=6, val_per_class=2,
                      test_per_class=3, image_size=24)
    return synthesize(tmp_path_factory.mktemp("world"), cfg, workers=1)


def write_image(path, size=(20, 20), colour=(200, 10, 10)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), colour, np.uint8)).save(path)


CLI = [sys.executable, "-m", "clipkd.cli"]  # the command line, as a subprocess runs it


def cli_env() -> dict[str, str]:
    """The environment of a ``clipkd`` subprocess: this checkout's sources first, one thread per process."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def image_folder(root: Path, n: int = 12, seed: int = 0) -> Path:
    """``n`` small random images of varying sizes in two class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16 + i % 3, 20, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def write_cnclip(tmp_path, world, bad_id="broken"):
    """A Chinese-CLIP test_imgs.tsv / test_texts.jsonl pair of six world images, one broken row and one caption
    naming a missing id."""
    import base64
    import json

    imgs = sorted((world / "test").rglob("*.png"))[:6]
    tsv, jsonl = tmp_path / "test_imgs.tsv", tmp_path / "test_texts.jsonl"
    with tsv.open("w") as f:
        for i, p in enumerate(imgs):
            f.write(f"{1000 + i}\t{base64.b64encode(p.read_bytes()).decode()}\n")
        f.write(f"{bad_id}\tnot-base64-@@@\n")
    with jsonl.open("w", encoding="utf-8") as f:
        for i, p in enumerate(imgs):
            f.write(json.dumps({"text_id": i, "text": f"一个{p.parent.name}", "image_ids": [1000 + i]},
                               ensure_ascii=False) + "\n")
        f.write(json.dumps({"text_id": 99, "text": "坏图", "image_ids": [bad_id]}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"text_id": 100, "text": "不存在", "image_ids": [424242]}, ensure_ascii=False) + "\n")
    return tsv, jsonl


@contextlib.contextmanager
def serve_on_loopback(app):
    """``app`` served by uvicorn in a thread on a free loopback port; yields its base URL, stops it after."""
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def teacher_spec(tmp_path_factory):
    """A saved random-weight open_clip clipkd-micro, loaded the way a user names a local teacher (the search tests')."""
    from clipkd.teachers import load_clip

    torch.manual_seed(0)
    return load_clip("open_clip:clipkd-micro").save(tmp_path_factory.mktemp("teacher"))
