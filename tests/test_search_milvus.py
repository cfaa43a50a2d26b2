"""The Milvus backend against Milvus Lite (embedded): build, search and filters equal to FAISS's exact answers, add
and remove, the service's routes, and bad input (another model's collection, an unreachable server, a kind Lite
does not keep), each one line before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from clipkd.cli import main  # noqa: E402
from clipkd.search.index import SearchIndex  # noqa: E402
from clipkd.search.writers import build_index


@pytest.fixture(scope="module")
def pair(tiny_world, teacher_spec, tmp_path_factory):
    """The same images indexed by FAISS (exact) and in a Milvus Lite collection."""
    root = tmp_path_factory.mktemp("milvus")
    faiss_ix = build_index(teacher_spec, tiny_world / "test", root / "faiss", kind="flat", device="cpu", workers=0,
                           progress=False)
    assert main(["-q", "index", "build", "--model", str(teacher_spec), "--images", str(tiny_world / "test"), "--out",
                 str(root / "mv"), "--backend", "milvus", "--uri", str(root / "mv.db"), "--device", "cpu",
                 "--workers", "0"]) == 0
    return faiss_ix, root / "mv"


def test_a_milvus_index_answers_as_exact_faiss_does_with_filters(pair, tiny_world):
    faiss_ix, root = pair
    mv = SearchIndex(root)
    assert mv.backend.name == "milvus" and len(mv) == len(faiss_ix) and mv.info["backend"] == "milvus"
    assert mv.info["milvus"]["uri"] == "../mv.db"  # relative to the index folder: it moves with it
    q = np.stack([faiss_ix.vector(int(r)) for r in faiss_ix.rows[:6]])
    s1, r1 = faiss_ix.search_vectors(q, 5)
    s2, r2 = mv.search_vectors(q, 5)
    assert (r1[:, 0] == r2[:, 0]).all() and np.allclose(s1, s2, atol=1e-3)
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(r1, r2, strict=True)]) >= 0.9
    label = faiss_ix.label(int(r1[0, 0]))
    hits = mv.search(image=next((tiny_world / "test").rglob("*.png")), k=4, label=label)
    assert hits and all(h["label"] == label for h in hits)
    with pytest.raises(Exception, match="no column 'colour'"):
        mv.search(image=next((tiny_world / "test").rglob("*.png")), k=4, where={"colour": "red"})


def test_milvus_add_remove_and_add_again(pair, tiny_world, capsys):
    _, root = pair
    before = SearchIndex(root)
    gone = before.paths[int(before.rows[0])]
    assert main(["-q", "index", "remove", "--index", str(root), gone]) == 0
    after = SearchIndex(root)
    assert len(after) == len(before) - 1 and after.generation == before.generation + 1
    _, rows = after.search_vectors(before.vector(int(before.rows[0]))[None], 5)
    assert int(before.rows[0]) not in rows[0]
    assert main(["-q", "index", "add", "--index", str(root), "--images", str(tiny_world / "val"), "--device", "cpu",
                 "--workers", "0"]) == 0
    grown = SearchIndex(root)
    n_val = len(list((tiny_world / "val").rglob("*.png")))
    assert len(grown) == len(after) + n_val
    assert main(["-q", "index", "add", "--index", str(root), "--images", str(tiny_world / "test"), "--device", "cpu",
                 "--workers", "0"]) == 0  # the removed image is in this folder: added again, it is back
    back = SearchIndex(root)
    assert len(back) == len(grown) + 1 and back.is_live(int(before.rows[0]))


def test_milvus_index_serves_every_route(pair, tiny_world, monkeypatch):
    from fastapi.testclient import TestClient

    from clipkd.search.service import create_app

    _, root = pair
    monkeypatch.setenv("CLIPKD_TOKEN", "a-token-of-sixteen-chars")
    ix = SearchIndex(root)
    c = TestClient(create_app(ix, token="a-token-of-sixteen-chars"))
    png = next((tiny_world / "test").rglob("*.png"))
    r = c.post("/search", files={"image": ("q.png", png.read_bytes(), "image/png")}, data={"k": "3"})
    assert r.status_code == 200 and len(r.json()["results"]) == 3, r.text
    v = ix.vector(int(ix.rows[1])).tolist()
    r = c.post("/knn-service", json={"embedding_input": v, "num_images": 2})
    assert r.status_code == 200 and r.json()[0]["id"] == int(ix.rows[1]), r.text
    label = ix.label(int(ix.rows[1]))
    r = c.post("/search", json={"k": 3, "label": label, "id": int(ix.rows[1])})
    assert r.status_code == 200 and all(h["label"] == label for h in r.json()["results"]), r.text
    r = c.post("/index/remove", json={"ids": [int(ix.rows[2])]},
               headers={"Authorization": "Bearer a-token-of-sixteen-chars"})
    assert r.status_code == 200 and r.json()["changed"] == 1, r.text


def test_milvus_bad_input_is_one_line_before_any_work(tiny_world, teacher_spec, tmp_path, capsys):
    from clipkd.teachers import load_clip

    torch.manual_seed(1)
    other = load_clip("open_clip:clipkd-micro").save(tmp_path / "other")
    db = tmp_path / "shared.db"
    args = ["index", "build", "--images", str(tiny_world / "val"), "--backend", "milvus", "--uri", str(db),
            "--collection", "photos", "--device", "cpu", "--workers", "0"]
    assert main(["-q", *args, "--model", str(teacher_spec), "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    for extra, want in ((["--model", str(other), "--out", str(tmp_path / "b")], "choose another --collection"),
                        (["--model", str(teacher_spec), "--out", str(tmp_path / "c"), "--kind", "hnsw"],
                         "not offered with --backend milvus")):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert want in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / extra[3] / "store" / "manifest.json").exists()  # refused before embedding
    assert main(["index", "build", "--model", str(teacher_spec), "--images", str(tiny_world / "val"), "--out",
                 str(tmp_path / "d"), "--backend", "milvus", "--uri", "http://127.0.0.1:9", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach Milvus at http://127.0.0.1:9" in err and len(err.splitlines()) == 1, err
    assert main(["index", "build", "--model", str(teacher_spec), "--images", str(tiny_world / "val"), "--out",
                 str(tmp_path / "e"), "--backend", "milvus", "--device", "cpu"]) == 2
    assert "needs --uri" in capsys.readouterr().err


def test_a_lite_file_is_one_process_at_a_time_and_opens_again_in_another(pair, tiny_world):
    import subprocess
    import sys

    from clipkd.search import milvus

    _, root = pair
    SearchIndex(root)  # this process holds the Lite file
    query = ["-m", "clipkd.cli", "search", "--index", str(root), "--image", str(next((tiny_world / "test").rglob(
        "*.png"))), "--k", "2"]
    r = subprocess.run([sys.executable, *query], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "open in another process" in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr
    milvus.release()
    r = subprocess.run([sys.executable, *query], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count("\n") >= 2, r.stderr  # the index moved on with its own Lite file
