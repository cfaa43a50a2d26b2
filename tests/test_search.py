"""The search product: index (build, resume, add, remove, approximate kinds), queries, the HTTP service and its
bad inputs, clip-retrieval's /knn-service, and select."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipkd.cli import main
from clipkd.errors import ClipkdError
from clipkd.search.index import SearchIndex
from clipkd.search.planning import make_faiss, recall_at_10
from clipkd.search.service import Batcher, create_app
from clipkd.search.writers import build_index, remove_from_index
from clipkd.store import EmbeddingStore, embed_paths


@pytest.fixture(scope="module")
def index(tiny_world, teacher_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "ix"
    return build_index(teacher_spec, tiny_world / "test", out, device="cpu", workers=0, progress=False)


@pytest.fixture(scope="module")
def client(index):
    from fastapi.testclient import TestClient

    return TestClient(create_app(SearchIndex(index.root)))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_index_build_search_and_labels(index, tiny_world):
    n = len(list((tiny_world / "test").rglob("*.png")))
    assert len(index) == n and index.info["kind"] == "flat" and index.info["recall@10"] == 1.0
    query = sorted((tiny_world / "test").rglob("*.png"))[3]
    hits = index.search(image=query, k=5)
    # keyed relative to the collection root (the folder indexed)
    assert hits[0]["path"] == query.relative_to(tiny_world / "test").as_posix()
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert hits[0]["label"] == query.parent.name.replace("_", " ")
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert len(index.search(text="a photo of a red circle.", k=4)) == 4
    with pytest.raises(ClipkdError, match="empty"):
        index.search(text="  ")


def test_interrupted_build_resumes_and_other_model_is_refused(tiny_world, teacher_spec, tmp_path):
    from clipkd.search.encoder import load_encoder
    from clipkd.search.keys import read_source

    enc = load_encoder(teacher_spec, device="cpu")
    src = read_source(tiny_world / "val")
    embed_paths(enc, src.root, src.paths, tmp_path / "ix" / "store", workers=0, shard_size=4, max_images=9,
                progress=False)  # a build killed after two finished shards
    done = len(EmbeddingStore(tmp_path / "ix" / "store"))
    calls = []
    real = enc.forward
    enc.forward = lambda x: calls.append(len(x)) or real(x)
    ix = build_index(teacher_spec, tiny_world / "val", tmp_path / "ix", encoder=enc, workers=0, progress=False)
    assert len(ix) == len(src.paths) and sum(calls) == len(src.paths) - done
    from clipkd.teachers import load_clip

    other = load_clip("open_clip:clipkd-micro").save(tmp_path / "other")
    with pytest.raises(ClipkdError, match="built by"):
        SearchIndex(tmp_path / "ix").load_encoder(other, device="cpu")
    with pytest.raises(ClipkdError, match="holds an index built by"):
        build_index(other, tiny_world / "val", tmp_path / "ix", device="cpu", workers=0, progress=False)
    with pytest.raises(ClipkdError, match="holds an index of .*index add"):  # a reused --out, other images
        build_index(teacher_spec, tiny_world / "test", tmp_path / "ix", encoder=enc, workers=0, progress=False)


def _live_keys(ix) -> set[str]:
    return {ix.paths[r] for r in np.flatnonzero(ix.live)}


def test_add_appends_remove_marks_compact_rewrites(tiny_world, teacher_spec, tmp_path):
    """``index add`` appends to the FAISS index (no rebuild: the rows it had keep their positions), ``index remove``
    marks rows that every query then skips, ``index compact`` rewrites the FAISS file without them; each change is
    a new generation named atomically in index.json."""
    ix = build_index(teacher_spec, tiny_world / "val", tmp_path / "ix", device="cpu", workers=0, progress=False)
    n, gen = len(ix), ix.generation
    assert main(["-q", "index", "add", "--index", str(tmp_path / "ix"), "--images", str(tiny_world / "test"),
                 "--device", "cpu", "--workers", "0"]) == 0
    grown = SearchIndex(tmp_path / "ix")
    assert len(grown) == n + len(list((tiny_world / "test").rglob("*.png"))) and grown.generation == gen + 1
    assert list(grown.rows[:n]) == list(ix.rows)  # appended, not rebuilt
    gone = grown.paths[0]
    q = grown.vector(int(grown.rows[0]))[None]
    assert grown.search_vectors(q, 1)[1][0][0] == grown.rows[0]
    assert remove_from_index(tmp_path / "ix", [gone]) == 1
    after = SearchIndex(tmp_path / "ix")
    assert len(after) == len(grown) - 1 and gone not in _live_keys(after) and after.info["tombstones"] == 1
    assert after.index.ntotal == grown.index.ntotal  # marked, not rewritten
    scores, rows = after.search_vectors(q, len(after) + 5)
    assert after.rows[0] not in rows[0] and (rows[0] >= 0).sum() == len(after)  # skipped, and every other row found
    with pytest.raises(KeyError):
        after.vector(int(after.rows[0]))
    with pytest.raises(ClipkdError, match="not in index"):
        remove_from_index(tmp_path / "ix", [str(tmp_path / "nope.png")])
    # a refused removal (it would empty the index) changes nothing
    with pytest.raises(ClipkdError, match="would be empty"):
        remove_from_index(tmp_path / "ix", list(after.paths))
    still = SearchIndex(tmp_path / "ix")
    assert still.generation == after.generation and _live_keys(still) == _live_keys(after)
    # compact rewrites the FAISS file without the removed row
    assert main(["-q", "index", "compact", "--index", str(tmp_path / "ix")]) == 0
    small = SearchIndex(tmp_path / "ix")
    assert small.index.ntotal == len(after) and not len(small.tombstones) and _live_keys(small) == _live_keys(after)
    assert sorted(p.name for p in (tmp_path / "ix" / "gen").iterdir()) == \
        [str(small.generation - 1), str(small.generation)]  # older generations pruned
    # adding a removed image again puts it back (it used to exit 0 and leave it out, saying nothing)
    lst = tmp_path / "again.txt"
    lst.write_text(f"{SearchIndex(tmp_path / 'ix').images_root / gone}\n")
    assert main(["-q", "index", "add", "--index", str(tmp_path / "ix"), "--images", str(lst), "--device", "cpu",
                 "--workers", "0"]) == 0
    back = SearchIndex(tmp_path / "ix")
    assert len(back) == len(grown) and gone in _live_keys(back)
    # removed, then added again before a compaction: its tombstone is lifted
    remove_from_index(tmp_path / "ix", [gone])
    assert main(["-q", "index", "add", "--index", str(tmp_path / "ix"), "--images", str(lst), "--device", "cpu",
                 "--workers", "0"]) == 0
    again = SearchIndex(tmp_path / "ix")
    assert len(again) == len(grown) and gone in _live_keys(again) and not len(again.tombstones)


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_approximate_kinds_report_recall(kind):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, 32))
    v = (centers[rng.integers(0, 50, 5000)] + 0.3 * rng.normal(size=(5000, 32))).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    index, params = make_faiss(v, kind)
    r = recall_at_10(index, v, queries=200)
    assert r >= (0.5 if kind == "ivfpq" else 0.8), (kind, r, params)
    exact, _ = make_faiss(v, "flat")
    assert recall_at_10(exact, v, queries=200) == 1.0


def test_service_search_paths(client, index, tiny_world):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["images"] == len(index) and h["text"] is True
    img_path = sorted((tiny_world / "test").rglob("*.png"))[0]
    r = client.post("/search", files={"image": ("q.png", img_path.read_bytes(), "image/png")}, data={"k": "5"})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 5 and res[0]["url"] == f"http://127.0.0.1:8000/images/{res[0]['id']}"  # the public URL
    assert "path" not in res[0] and index.image_path(res[0]["id"]) == img_path.resolve()  # ids, not server paths
    by_id = client.post("/search", json={"id": res[1]["id"], "k": 3}).json()["results"]
    assert by_id[0]["id"] == res[1]["id"]
    assert len(client.post("/search", json={"text": "a blue square", "k": 7}).json()["results"]) == 7
    b64 = base64.b64encode(img_path.read_bytes()).decode()
    assert client.post("/search", json={"image": b64, "k": 2}).json()["results"][0]["id"] == res[0]["id"]
    got = client.get(f"/images/{res[0]['id']}")
    assert got.status_code == 200 and got.content == img_path.read_bytes()
    thumb = client.get(f"/images/{res[0]['id']}?thumb=1")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    page = client.get("/")
    assert page.status_code == 200 and "clipkd search" in page.text
    assert client.get("/openapi.json").status_code == 200


def test_service_bad_inputs_are_4xx_and_it_keeps_serving(client, tiny_world):
    good = sorted((tiny_world / "test").rglob("*.png"))[0].read_bytes()
    bomb = _png(Image.new("L", (9000, 9000)))  # 81 Mpixel in a few KB: refused from its header
    cases = [
        (client.post("/search", files={"image": ("x.txt", b"hello, not an image", "text/plain")}), 400),
        (client.post("/search", files={"image": ("t.png", good[: len(good) // 2], "image/png")}), 400),
        (client.post("/search", files={"image": ("b.png", bomb, "image/png")}), 413),
        (client.post("/search", content=b"x" * (21 << 20), headers={"content-type": "application/json"}), 413),
        (client.post("/search", json={"text": ""}), 400),
        (client.post("/search", json={"text": "a", "k": 0}), 400),
        (client.post("/search", json={"text": "a", "k": 101}), 400),
        (client.post("/search", json={"id": 10**9}), 404),
        (client.post("/search", json={"text": "a", "id": 1}), 400),
        (client.post("/search", content=b"{nope", headers={"content-type": "application/json"}), 400),
        (client.get("/images/../../etc/passwd"), 404),
        (client.get("/images/..%2F..%2Fetc%2Fpasswd"), 404),
        (client.get("/images/-1"), 404),
        (client.post("/knn-service", json={"image_url": "http://example.com/x.jpg"}), 400),
        # once 500s: an overflowing count, a body nested past the parser's depth, a Unicode digit as an id
        (client.post("/knn-service", content=b'{"text": "a", "num_images": 1e400}',
                     headers={"content-type": "application/json"}), 400),
        (client.post("/search", content=b"[" * 200_000 + b"]" * 200_000, headers={"content-type": "application/json"}),
         400),
        (client.post("/knn-service", content=b"[" * 200_000 + b"]" * 200_000,
                     headers={"content-type": "application/json"}), 400),
        (client.get("/images/%C2%B2"), 404),
        # once taken as 1 or silently ignored
        (client.post("/search", json={"text": "a", "k": True}), 400),
        (client.post("/search", json={"text": "a", "k": 1.7}), 400),
        (client.post("/knn-service", json={"text": "a", "modality": "text"}), 400),
    ]
    for r, status in cases:
        assert r.status_code == status, (r.status_code, r.text)
        if r.headers.get("content-type", "").startswith("application/json"):
            assert isinstance(r.json().get("detail"), str)
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/search", json={"text": "a red circle", "k": 1}).status_code == 200


def test_what_a_client_is_told_names_its_own_fields_and_never_echoes_it(index, tiny_world):
    """Round five: a public URL on /search too, no object repr for a non-image, the field /knn-service was sent,
    a removed image said to be removed, a 422 without the input, and every filter holds."""
    from fastapi.testclient import TestClient

    c = TestClient(create_app(index.root, public_url="https://search.example.com/", reload_s=0))
    res = c.post("/search", json={"text": "a red circle", "k": 3}).json()["results"]
    assert [r["url"] for r in res] == [f"https://search.example.com/images/{r['id']}" for r in res]
    knn = c.post("/knn-service", json={"text": "a red circle", "num_images": 3, "deduplicate": False}).json()
    assert knn[0]["url"].startswith("https://search.example.com/images/")
    r = c.post("/search", files={"image": ("x.txt", b"hello, not an image", "text/plain")})
    assert r.status_code == 400 and " at 0x" not in r.json()["detail"] and "BytesIO" not in r.json()["detail"]
    assert r.json()["detail"].startswith("cannot decode the image")
    for field in ("num_images", "num_result_ids"):
        r = c.post("/knn-service", json={"text": "a", field: "many"})
        assert r.status_code == 400 and r.json()["detail"].startswith(f"{field} must be"), r.text
    r = c.get("/images/0?thumb=<script>secret</script>")
    assert r.status_code == 422 and "secret" not in r.text and "thumb" in r.json()["detail"], r.text
    labels = sorted({h["label"] for h in c.post("/search", json={"text": "x", "k": 100}).json()["results"]})
    a, b = labels[0], labels[1]
    both = c.post("/search", json={"text": "x", "k": 10, "label": a, "where": {"label": b}})
    assert both.status_code == 200 and both.json()["results"] == [], both.text  # every filter must hold
    same = c.post("/search", json={"text": "x", "k": 10, "label": a, "where": {"label": a}}).json()["results"]
    assert same and all(h["label"] == a for h in same)
    for bad in ({"label": 1.5}, {"label": True}, {"where": {"label": 1.5}}, {"where": {"label": True}},
                {"where": {"label": [a]}}, {"label": [a]}):
        r = c.post("/search", json={"text": "x", **bad})
        assert r.status_code == 400, (bad, r.text)  # a bad value is a 400 whether in `label` or in `where`
    assert c.post("/search", json={"text": "x", "label": 7}).json()["results"] == \
        c.post("/search", json={"text": "x", "where": {"label": 7}}).json()["results"] == []


def test_knn_service_speaks_clip_retrievals_protocol(client, tiny_world):
    img = sorted((tiny_world / "test").rglob("*.png"))[2]
    body = {"image": base64.b64encode(img.read_bytes()).decode(), "modality": "image", "num_images": 4,
            "indice_name": "ix", "num_result_ids": 4, "use_mclip": False, "deduplicate": True,
            "use_safety_model": False, "use_violence_detector": False, "aesthetic_score": "", "aesthetic_weight": ""}
    body["deduplicate"] = False
    res = client.post("/knn-service", json=body).json()
    assert len(res) == 4 and set(res[0]) == {"url", "id", "similarity", "caption"}  # no server path
    # URLs start with the public URL (create_app's default, `serve --public-url`), never with the request's Host
    assert res[0]["url"] == f"http://127.0.0.1:8000/images/{res[0]['id']}"
    spoofed = client.post("/knn-service", json=body, headers={"Host": "evil.example"}).json()
    assert [r["url"] for r in spoofed] == [r["url"] for r in res]
    got = client.get(res[0]["url"].removeprefix("http://127.0.0.1:8000"))
    assert got.status_code == 200 and got.content == img.read_bytes()
    text = client.post("/knn-service", json={"text": "a green triangle", "modality": "image", "num_images": 3,
                                             "deduplicate": False})
    assert len(text.json()) == 3
    dim = len(SearchIndex(client.app.state.service.index.root).vector(0))
    emb = client.post("/knn-service", json={"embedding_input": [0.1] * dim, "num_images": 2, "deduplicate": False})
    assert len(emb.json()) == 2
    assert client.get("/indices-list").json() == ["ix"]
    # the first seed's documented search asks for 5000 (num_result_ids 10000): answered with what the index has
    many = client.post("/knn-service", json={"text": "a red circle", "num_images": 5000, "num_result_ids": 10000,
                                             "deduplicate": False})
    assert many.status_code == 200 and len(many.json()) == len(SearchIndex(client.app.state.service.index.root))
    assert all(-1.0 <= r["similarity"] <= 1.0 for r in many.json())


def test_knn_service_honours_or_reports_every_clip_retrieval_field(client):
    """deduplicate (ClipClient's default true) drops results within cosine 0.94 of a better one, as clip-retrieval
    does; use_mclip is refused; the safety, violence and aesthetic fields and another indice_name (ClipClient and the
    seed's search script send them by default) are accepted and named in a header, never silently ignored."""
    ix = SearchIndex(client.app.state.service.index.root)
    query = {"text": "a red circle", "num_images": 10000, "num_result_ids": 10000}
    every = client.post("/knn-service", json=query | {"deduplicate": False}).json()
    r = client.post("/knn-service", json=query | {"use_safety_model": True, "use_violence_detector": True,
                                                    "aesthetic_score": "9", "aesthetic_weight": "0.5"})
    kept = r.json()
    assert r.status_code == 200 and 0 < len(kept) <= len(every)
    assert r.headers["x-clipkd-not-computed"] == "use_safety_model,use_violence_detector,aesthetic_score"
    assert "x-clipkd-not-computed" not in client.post("/knn-service", json=query).headers
    unit = {h["id"]: ix.vector(h["id"]) / np.linalg.norm(ix.vector(h["id"])) for h in every}
    kept_ids = [h["id"] for h in kept]
    assert kept_ids == [h["id"] for h in every if h["id"] in set(kept_ids)]  # ranking order kept
    for a in kept_ids:  # no two kept results are near-copies
        assert all(float(unit[a] @ unit[b]) < 0.94 for b in kept_ids if b != a)
    for h in every:  # every dropped result is a near-copy of a better-ranked kept one
        if h["id"] not in kept_ids:
            better = kept_ids[: [e["id"] for e in every].index(h["id"])]
            assert max(float(unit[h["id"]] @ unit[b]) for b in better if b in unit) >= 0.94
    assert len(client.post("/knn-service", json={"text": "a red circle", "num_images": 2}).json()) <= 2
    # the seed's search script sends indice_name laion5B-L-14 by default: answered from the one index, and reported
    seed = client.post("/knn-service", json={"text": "a red circle", "indice_name": "laion5B-L-14"})
    assert seed.status_code == 200 and seed.json() and seed.headers["x-clipkd-not-computed"] == "indice_name"
    assert seed.headers["x-clipkd-index"] == ix.root.name
    for bad in ({"use_mclip": True}, {"deduplicate": "yes"}):
        r = client.post("/knn-service", json={"text": "a red circle"} | bad)
        assert r.status_code == 400 and isinstance(r.json()["detail"], str), bad


def test_the_seeds_search_and_download_scripts_get_savable_images(client):
    """A replay of the first seed's step 1 (written from NVIDIA clip-distillation's search_clip_images.py and
    download_images.py, not vendored): the search posts its default body, keeps ``item['url']`` of each item, and the
    downloader saves only JPEG and PNG answers. Pointed at clipkd serve, every URL comes back and is saved."""
    body = {"text": "a red circle", "image": None, "image_url": None, "embedding_input": None, "modality": "image",
            "num_images": 40, "indice_name": "laion5B-L-14", "num_result_ids": 3000, "use_mclip": False,
            "deduplicate": True, "use_safety_model": True, "use_violence_detector": True, "aesthetic_score": "",
            "aesthetic_weight": "0.5"}
    response = client.post("/knn-service", json=body)
    urls = [item["url"] for item in response.json() if "url" in item]  # the script's own parsing
    assert response.status_code == 200 and urls
    saved = 0
    for url in urls:  # the downloader: requests.get(url), then the content type decides the extension
        r = client.get(url)
        ext = {"image/jpeg": ".jpg", "image/png": ".png"}.get(r.headers.get("content-type", ""))
        if r.status_code == 200 and ext:
            Image.open(io.BytesIO(r.content)).verify()
            saved += 1
    assert saved == len(urls)


def test_show_paths_gives_paths_relative_to_the_collection(index, tiny_world):
    from fastapi.testclient import TestClient

    c = TestClient(create_app(SearchIndex(index.root), show_paths=True, public_url="https://search.example/"))
    res = c.post("/knn-service", json={"text": "a red circle", "num_images": 3, "deduplicate": False}).json()
    root = (tiny_world / "test").resolve()
    assert all(not r["path"].startswith("/") and (root / r["path"]).is_file() for r in res)
    assert res[0]["url"] == f"https://search.example/images/{res[0]['id']}"
    assert all("path" in r and not r["path"].startswith("/")
               for r in c.post("/search", json={"text": "a red circle", "k": 2}).json()["results"])


def test_one_parser_of_hash_in_row_keys():
    """A file whose name holds '#' is a file (``--show-paths`` gave '/photos/#1.jpg' back as '.#1.jpg'); only a
    ``FILE.tsv#ID`` key is a TSV row."""
    from clipkd.search.keys import split_key
    from clipkd.search.service import _common_root, _relative

    assert split_key("/photos/#1.jpg") == ("/photos/#1.jpg", "")
    assert split_key("/data/valid_imgs.tsv#1000002") == ("/data/valid_imgs.tsv", "1000002")
    assert split_key("/a#b/c.TSV#7") == ("/a#b/c.TSV", "7")
    keys = ["/photos/#1.jpg", "/photos/b/#2.jpg"]
    root = _common_root(keys)
    assert root == "/photos" and [_relative(k, root) for k in keys] == ["#1.jpg", "b/#2.jpg"]
    tsv = ["/data/x_imgs.tsv#1", "/data/x_imgs.tsv#2"]
    assert [_relative(k, _common_root(tsv)) for k in tsv] == ["x_imgs.tsv#1", "x_imgs.tsv#2"]


def test_batcher_runs_concurrent_queries_as_one_batch(index):
    index.encoder or index.load_encoder(device="cpu")
    b = Batcher(window_s=0.3)
    x = torch.zeros(3, *index.encoder.preprocess(Image.new("RGB", (24, 24))).shape[1:])
    futs = [b.submit(index, x, 3) for _ in range(8)]
    results = [f.result(timeout=60) for f in futs]
    assert list(b.batches) == [8] and all(len(r) == 3 for r in results)


def test_concurrent_http_queries_all_succeed(client, tiny_world):
    img = sorted((tiny_world / "test").rglob("*.png"))[1].read_bytes()
    codes = []

    def one():
        codes.append(client.post("/search", files={"image": ("q.png", img, "image/png")}).status_code)

    threads = [threading.Thread(target=one) for _ in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert codes == [200] * 12
    assert sum(client.app.state.service.batcher.batches) >= 12


def test_text_cache_and_batches_show_on_metrics(index):
    """A repeated text query is answered from the bounded cache with the same results (hits and misses on
    /metrics); the cache keeps at most its size; batch sizes and queue depth are exported."""
    from fastapi.testclient import TestClient

    client = TestClient(create_app(SearchIndex(index.root), reload_s=0))
    svc = client.app.state.service
    svc.cache_size = 2
    first = client.post("/search", json={"text": "a blue square", "k": 5}).json()["results"]
    again = client.post("/search", json={"text": "  a blue square ", "k": 5}).json()["results"]
    assert first == again
    for text in ("a red circle", "a green star", "a red circle"):
        assert client.post("/search", json={"text": text}).status_code == 200
    assert list(svc.text_cache) == ["a green star", "a red circle"]  # the least recently asked went first
    img = _png(Image.new("RGB", (40, 30), (200, 30, 30)))
    assert client.post("/search", files={"image": ("q.png", img, "image/png")}).status_code == 200
    m = client.get("/metrics").text
    assert 'clipkd_text_cache_total{result="hit"} 2.0' in m and 'clipkd_text_cache_total{result="miss"} 3.0' in m
    assert "clipkd_batch_size_count 1.0" in m and "clipkd_queue_depth 0.0" in m


def test_batcher_skips_a_query_whose_request_gave_up(index):
    index.encoder or index.load_encoder(device="cpu")
    b = Batcher(window_s=0.3)
    x = torch.zeros(3, *index.encoder.preprocess(Image.new("RGB", (24, 24))).shape[1:])
    futs = [b.submit(index, x, 3) for _ in range(4)]
    assert futs[1].cancel()
    assert all(len(f.result(timeout=60)) == 3 for f in futs if f is not futs[1])
    assert list(b.batches) == [3]
    from clipkd.search.service import QueryError

    with pytest.raises(QueryError, match="busy") as e:  # a full queue refuses at once
        Batcher(max_queue=0).submit(index, x, 3)
    assert e.value.status == 503


def test_select_writes_a_training_list(index, tmp_path):
    """The CLI with the rules switched off (no background, no margin cut): each image goes to its best class, the
    ``per_class`` most typical of them (closest to the trimmed centre of the class's candidates), as the index's own
    embeddings and the prompts' embeddings say."""
    from clipkd.data.datasets import read_image_list
    from clipkd.prompts import embed_prompts
    from clipkd.search.expand import typicality

    prompts = {"red circle": ["a photo of a red circle."], "blue square": ["a photo of a blue square."]}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    assert main(["-q", "select", "--index", str(index.root), "--prompts", str(tmp_path / "prompts.json"),
                 "--per-class", "3", "--duplicate", "1.01", "--background", "none", "--margin", "0",
                 "--out", str(tmp_path / "train.csv"), "--device", "cpu"]) == 0
    listed = read_image_list(tmp_path / "train.csv")
    enc = index.encoder or index.load_encoder(device="cpu")
    emb = np.asarray(index.store.embeddings(), np.float32)
    sims = emb @ embed_prompts(enc, prompts).embeddings.T
    want = {}
    for c, name in enumerate(prompts):
        rows = np.flatnonzero(sims.argmax(1) == c)
        rows = rows[np.argsort(-typicality(emb[rows]), kind="stable")][:3]
        want.update({(index.images_root / index.paths[r]).resolve(): name for r in rows})
    got = {(listed.root / p).resolve(): listed.classnames[y] for p, y in zip(listed.paths, listed.labels, strict=True)}
    assert got == want and 0 < len(got) <= 6
    # the list names its images relative to its own folder: list and pool move to another machine together
    assert all(not Path(p).is_absolute() for p in listed.paths)
    assert str(tmp_path.parent) not in (tmp_path / "train.csv").read_text()
    for bad, msg in ((["--min-per-class", "-1"], "min-per-class"), (["--margin", "3"], "margin"),
                     (["--background", str(tmp_path / "none.txt")], "background phrases not found")):
        assert main(["select", "--index", str(index.root), "--prompts", str(tmp_path / "prompts.json"),
                     "--out", str(tmp_path / "x.csv"), *bad]) == 2, msg


def test_selection_rejects_background_ambiguous_and_removed_images_and_caps_each_class():
    """The rules on embeddings whose truth is known: three classes of 40 images each (one class's images tighter
    than the others), 120 background images nearer the background prompt than any class, 30 images half-way
    between two classes (margin ≈ 0), two removed rows: every kept image is of its class, every class keeps most of
    its images (most typical first), the quota caps and counts, and a class with no images is reported short."""
    from types import SimpleNamespace

    from clipkd.search.expand import typicality
    from clipkd.search.select import _assign, otsu, short_reason

    rng = np.random.default_rng(0)
    d = 32
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0][:5]  # orthonormal: 4 class texts and the background text
    text, bank = basis[:4], basis[4:5]

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    rows, truth = [], []
    for c, spread in ((0, 0.25), (1, 0.35), (2, 0.6)):
        rows.append(unit(text[c] + spread * rng.normal(size=(40, d)) / np.sqrt(d)))
        truth += [c] * 40
    rows.append(unit(bank[0] + 0.3 * text[:3].mean(0) + 0.3 * rng.normal(size=(120, d)) / np.sqrt(d)))
    truth += [-1] * 120
    rows.append(unit(text[0] + text[1] + 0.05 * rng.normal(size=(30, d)) / np.sqrt(d)))
    truth += [-2] * 30
    emb = np.concatenate(rows)
    live = np.ones(len(emb), bool)
    live[[0, 41]] = False  # removed from the index: never chosen
    index = SimpleNamespace(store=SimpleNamespace(embeddings=lambda: emb), live=live, images_root=Path("/pool"),
                            paths=[f"{i}.png" for i in range(len(emb))])
    names = ["a", "b", "c", "empty"]
    chosen, rejected, reasons, cuts, counts = _assign(index, text, names, bank, 50, -1.0, 0.999)
    row = {f"/pool/{i}.png": i for i in range(len(emb))}
    for c, name in enumerate(names[:3]):
        picked = [row[p] for p, _ in chosen[name]]
        assert all(truth[r] == c and live[r] for r in picked), name  # precision 1: no background, no ambiguous
        assert len(picked) >= 30, (name, len(picked))
        typical = typicality(emb[picked])
        assert np.all(np.diff(typical) <= 1e-6) or len(picked) < 3, name  # most typical first
        assert not {p for p, _ in rejected[name]} & {p for p, _ in chosen[name]}
    assert chosen["empty"] == [] and reasons["background"] >= 100 and reasons["margin"] >= 25
    assert sum(map(len, chosen.values())) + sum(reasons.values()) == live.sum()  # each row: chosen or one rule
    assert all(counts[n]["kept"] == len(chosen[n]) and counts[n]["image_space"] == 0 for n in names)
    assert "no higher than the background" in short_reason(counts["empty"])  # the warning's why
    assert "no pool image scores highest" in short_reason({**counts["empty"], "turned_down": 0})
    assert counts["a"]["turned_down"] >= 1 and "below its margin cut" in short_reason(
        {**counts["a"], "kept": 0, "near_cut": 3})
    capped, _, counted, _, _ = _assign(index, text, names, bank, 20, -1.0, 0.999)
    assert [len(capped[n]) for n in names] == [20, 20, 20, 0] and counted["quota"] == reasons["quota"] + sum(
        len(chosen[n]) - 20 for n in names[:3])
    no_bank = _assign(index, text, names, None, 50, -1.0, 0.999)[0]
    assert any(truth[row[p]] == -1 for v in no_bank.values() for p, _ in v)  # the bank is what rejects them
    no_cut = _assign(index, text, names, bank, 50, -1.0, 0.999, margin=0.0)[0]
    assert any(truth[row[p]] == -2 for v in no_cut.values() for p, _ in v)  # the margin cut is what rejects them
    t, share = otsu(np.r_[np.zeros(50), np.ones(50)])
    assert 0 < t < 1 and share == pytest.approx(1.0)
    assert otsu(np.ones(5)) == (-np.inf, 0.0)


def test_examples_reject_what_the_prompts_cannot_tell_from_the_class():
    """Images the text scores as the class as surely as its own (same text cosine and margin) but far from its
    labelled examples in the image space: without examples they fill the class's quota; with them every pick is the
    class's own, most of its images are kept, and the rule's rejections are counted."""
    from types import SimpleNamespace

    from clipkd.search.select import EXAMPLE_QUANTILE, _assign

    rng = np.random.default_rng(1)
    d = 48
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0][:5]
    text, own, other = basis[:2], basis[2], basis[3]  # class texts; the class's look; a lookalike's

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    def draw(n, look):
        return unit(text[0] + 0.8 * look + 0.15 * rng.normal(size=(n, d)) / np.sqrt(d))

    examples, real, lookalike = draw(200, own), draw(30, own), draw(60, other)
    b = unit(text[1] + 0.15 * rng.normal(size=(40, d)) / np.sqrt(d))
    emb = np.concatenate([real, lookalike, b])
    index = SimpleNamespace(store=SimpleNamespace(embeddings=lambda: emb), live=np.ones(len(emb), bool),
                            images_root=Path("/pool"), paths=[f"{i}.png" for i in range(len(emb))])
    proto = unit(examples.mean(0))
    protos = {"a": (proto, float(np.quantile(examples @ proto, EXAMPLE_QUANTILE)))}
    plain = _assign(index, text, ["a", "b"], None, 80, -1.0, 0.999, margin=0.0)[0]  # the examples rule alone
    assert sum(int(p[6:-4]) >= 30 for p, _ in plain["a"]) > 30  # the prompts alone take the lookalikes
    chosen, _, reasons, _, _ = _assign(index, text, ["a", "b"], None, 80, -1.0, 0.999, margin=0.0, protos=protos)
    picked = [int(p[6:-4]) for p, _ in chosen["a"]]
    assert all(r < 30 for r in picked) and len(picked) >= 25, picked
    assert len(chosen["b"]) == 40 and reasons["examples"] >= 60


def _directions(seed: int, noise: float, d: int = 48):
    """Six orthonormal directions of a d-dim embedding space and a sampler of unit vectors around sums of them."""
    rng = np.random.default_rng(seed)

    def draw(n, *parts):
        x = sum(parts) + noise * rng.normal(size=(n, d)) / np.sqrt(d)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    return np.linalg.qr(rng.normal(size=(d, d)))[0][:6], draw


def _pool_of(emb: np.ndarray):
    """A stand-in for a pool's index over ``emb`` (every row live, row i at /pool/i.png)."""
    from types import SimpleNamespace

    return SimpleNamespace(store=SimpleNamespace(embeddings=lambda: emb), live=np.ones(len(emb), bool),
                           images_root=Path("/pool"), paths=[f"{i}.png" for i in range(len(emb))])


def test_expansion_finds_the_rest_of_a_class_the_text_turned_down_and_no_distractor():
    """A class whose prompt scores most of its own images no higher than 180 distractors (both below the floor the
    prompt's cut sets): the text keeps 39 of its 100 images; voting over the image space's neighbours from those
    finds the other 61 and no distractor (which lie elsewhere in the image space, some half-way), counts them apart,
    and keeps the text's picks; an unknown expansion is one line."""
    from clipkd.search.select import _assign, select_images

    (t0, t1, look0, look1, far, half), draw = _directions(2, 0.45)
    emb = np.concatenate([draw(40, t0, 0.8 * look0), draw(60, 0.5 * t0, 0.8 * look0), draw(40, t1, 0.8 * look1),
                          draw(120, 0.5 * t0, 0.8 * far), draw(60, 0.5 * t0, 0.5 * look0, 0.8 * half)])
    truth = np.r_[np.zeros(100), np.ones(40), -np.ones(180)]
    index = _pool_of(emb)
    text = np.stack([t0, t1]).astype(np.float32)

    def picks(expand):
        chosen, _, reasons, _, counts = _assign(index, text, ["a", "b"], None, 500, 0.7, 0.999, margin=0.0,
                                                expand=expand)
        return [int(p[6:-4]) for p, _ in chosen["a"]], counts["a"], reasons

    plain, counted, _ = picks("none")
    assert all(truth[r] == 0 for r in plain) and len(plain) < 50 and counted["text"] == len(plain)
    voted, counted, reasons = picks("vote")
    assert all(truth[r] == 0 for r in voted) and len(voted) >= 95, (len(voted), sorted(truth[voted]))
    assert set(plain) <= set(voted) and counted["image_space"] == len(voted) - len(plain)
    clustered, counted, _ = picks("cluster")  # the parts of the image space's neighbour graph, decided whole
    assert all(truth[r] == 0 for r in clustered) and len(clustered) >= 90, (len(clustered), sorted(truth[clustered]))
    with pytest.raises(ClipkdError, match="`expand` must be one of"):
        select_images(index, {"a": ["a"]}, Path("x.csv"), expand="bogus")


def test_a_class_quota_is_filled_most_typical_first_not_by_the_lookalikes_that_outscore_it():
    """20 lookalikes the class's prompt scores higher than any of its 40 own images (nearer its text, away from its
    images' look): ordered by text score they would take 20 of the 40 places; filled most typical first (closest to
    the trimmed centre of the class's candidates), every pick is the class's own."""
    from clipkd.search.select import _assign

    (t0, t1, look0, look1, fake, _), draw = _directions(4, 0.3)
    emb = np.concatenate([draw(40, t0, 0.8 * look0), draw(20, 1.6 * t0, 0.5 * fake), draw(30, t1, 0.8 * look1)])
    text = np.stack([t0, t1]).astype(np.float32)
    s1 = emb[:60] @ text[0]
    assert np.sum(np.argsort(-s1)[:40] >= 40) == 20  # the text's own order: the lookalikes first
    chosen = _assign(_pool_of(emb), text, ["a", "b"], None, 40, -1.0, 0.999, margin=0.0, expand="none")[0]
    picked = [int(p[6:-4]) for p, _ in chosen["a"]]
    assert len(picked) == 40 and all(r < 40 for r in picked), sorted(picked)


def test_a_class_with_examples_is_filled_closest_to_their_mean():
    """Tight lookalikes, most of which pass the examples' cut and outnumber the class's 40 own images: the picks' own
    trimmed centre is theirs, so a class with examples fills its quota closest to the examples' mean instead."""
    from clipkd.search.expand import typicality
    from clipkd.search.select import EXAMPLE_QUANTILE, _assign

    (t0, t1, own, look1, fake, _), draw = _directions(6, 0.35)
    examples, real = draw(300, t0, 0.8 * own), draw(40, t0, 0.8 * own)
    lookalike = _directions(7, 0.08)[1](100, t0, 0.8 * own, 0.4 * fake)
    emb = np.concatenate([real, lookalike, draw(30, t1, 0.8 * look1)])
    proto = examples.mean(0) / np.linalg.norm(examples.mean(0))
    protos = {"a": (proto, float(np.quantile(examples @ proto, EXAMPLE_QUANTILE)))}
    passed = lookalike @ proto >= protos["a"][1]
    assert passed.sum() > 40  # the examples' cut lets most of them through, more than the class's own
    cand = np.concatenate([real, lookalike[passed]])
    assert np.sum(np.argsort(-typicality(cand))[:40] < 40) < 10  # the picks' own centre: the lookalikes'
    chosen = _assign(_pool_of(emb), np.stack([t0, t1]).astype(np.float32), ["a", "b"], None, 40, -1.0, 0.999,
                     margin=0.0, protos=protos, expand="none")[0]
    picked = [int(p[6:-4]) for p, _ in chosen["a"]]
    assert len(picked) == 40 and sum(r < 40 for r in picked) >= 30, sorted(picked)


def test_a_cluster_the_background_claims_part_of_is_rejected_whole(monkeypatch):
    """Lookalikes the class's prompt scores as high as its own images (60, one tight group in the image space), a
    tenth of which lose to the background prompt: the text keeps the rest of them; the cluster rule rejects the
    whole group and keeps the class's 50 real images."""
    from clipkd.search.select import _assign

    (t0, t1, bg, look0, look1, fake), draw = _directions(3, 0.3)
    emb = np.concatenate([draw(50, t0, 0.8 * look0), draw(30, t1, 0.8 * look1),
                          draw(54, 0.5 * t0, 0.8 * fake, 0.4 * bg), draw(6, 0.4 * t0, 0.8 * fake, 0.5 * bg)])
    index = _pool_of(emb)
    text, bank = np.stack([t0, t1]).astype(np.float32), bg[None].astype(np.float32)
    plain = [int(p[6:-4]) for p, _ in _assign(index, text, ["a", "b"], bank, 500, -1.0, 0.999, margin=0.0)[0]["a"]]
    assert sum(r >= 80 for r in plain) >= 40  # the text alone keeps the lookalikes
    chosen, _, reasons, _, _ = _assign(index, text, ["a", "b"], bank, 500, -1.0, 0.999, margin=0.0, expand="cluster")
    kept = [int(p[6:-4]) for p, _ in chosen["a"]]
    # (a lookalike with no mutual neighbour is a cluster too small to decide: the text's verdict stands)
    assert sum(r >= 50 for r in kept) <= 5 and sum(r < 50 for r in kept) >= 45 and reasons["cluster"] >= 40, reasons

    def search_vectors(q, k):  # a pool too large for exact neighbours asks its index (here: exact, row order kept)
        sims = q @ emb.T
        top = np.argsort(-sims, axis=1)[:, :k]
        return np.take_along_axis(sims, top, 1), top

    monkeypatch.setattr("clipkd.search.expand.EXACT_ROWS", 0)
    index.search_vectors = search_vectors
    via = _assign(index, text, ["a", "b"], bank, 500, -1.0, 0.999, margin=0.0, expand="cluster")[0]
    assert via == chosen


def test_source_with_examples_checks_them_before_work(teacher_spec, tiny_world, tmp_path, capsys):
    """`source --examples --examples-store`: the seen classes' training images shape their picks; a store missing,
    from another teacher, or examples of a class with no prompt are one line each, before the pool is embedded."""
    import clipkd

    store = tmp_path / "train-store"
    clipkd.embed_images(clipkd.load_teacher(teacher_spec, device="cpu"), tiny_world / "train", store, workers=0,
                        progress=False)
    out = tmp_path / "sourced"
    args = ["source", "--teacher", teacher_spec, "--pool", str(tiny_world / "test"), "--classes",
            str(tiny_world / "train"), "--per-class", "3", "--device", "cpu", "--workers", "0"]
    assert main(args + ["--out", str(out), "--examples", str(tiny_world / "train"), "--examples-store",
                        str(store)]) == 0
    rows = (out / "selected.csv").read_text().splitlines()
    assert rows[0] == "path,label,similarity" and len(rows) > 1
    one = tmp_path / "one-class.txt"  # prompts for one class only: the examples' other classes have none
    one.write_text(_classes(tiny_world)[0] + "\n")
    prompts = tmp_path / "prompts.json"  # `select` over the same index takes the same examples
    assert main(["prompts", "--classes", str(tiny_world / "train"), "--out", str(prompts)]) == 0
    kept = {}
    for q in ("0.05", "0.6"):  # no cap and no other rule, so only the examples' cut decides how many stay
        assert main(["select", "--index", str(out / "index"), "--prompts", str(prompts), "--per-class", "1000",
                     "--background", "none", "--margin", "0", "--duplicate", "1.01", "--examples",
                     str(tiny_world / "train"), "--examples-store", str(store), "--example-quantile", q,
                     "--out", str(tmp_path / f"q{q}.csv"), "--device", "cpu"]) == 0
        kept[q] = len((tmp_path / f"q{q}.csv").read_text().splitlines()) - 1
    assert 1 <= kept["0.6"] < kept["0.05"], kept  # a stricter cut keeps fewer
    for extra, says in ((["--examples", str(tiny_world / "train")], "go together"),
                        (["--examples", str(tiny_world / "train"), "--examples-store", str(tmp_path / "nope")],
                         "examples store not found"),
                        (["--examples", str(tiny_world / "train"), "--examples-store", str(store),
                          "--example-quantile", "1.5"], "must be in [0, 1)"),
                        (["--examples", str(tmp_path / "nowhere"), "--examples-store", str(store)], "nowhere"),
                        (["--examples", str(tiny_world / "train"), "--examples-store", str(store), "--classes",
                          str(one)], "have no prompt")):
        capsys.readouterr()
        assert main(args + ["--out", str(tmp_path / "bad"), *extra]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()  # refused before the pool is embedded
    from clipkd.search.select import example_prototypes

    with pytest.raises(ClipkdError, match="from the pool index's teacher"):
        example_prototypes(tiny_world / "train", store, _classes(tiny_world), "other:teacher")
    with pytest.raises(ClipkdError, match="have no prompt"):
        example_prototypes(tiny_world / "train", store, ["not a class"], EmbeddingStore(store).teacher)


def _classes(world: Path) -> list[str]:
    from clipkd.data.datasets import load_labelled

    return load_labelled(world / "train").classnames


def test_cli_search_writes_a_grid(index, tiny_world, tmp_path, capsys):
    img = sorted((tiny_world / "test").rglob("*.png"))[0]
    assert main(["search", "--index", str(index.root), "--image", str(img), "--k", "4", "--out",
                 str(tmp_path / "grid.png"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert img.relative_to(tiny_world / "test").as_posix() in out.splitlines()[0]
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert main(["search", "--index", str(tmp_path / "nope"), "--text", "x"]) == 2


def test_chinese_clip_index_over_a_tsv_with_chinese_text(tiny_world, tmp_path):
    """A Chinese-CLIP TSV as the image source (a broken row skipped and counted), Chinese text queries, and the
    service serving TSV rows as images."""
    from fastapi.testclient import TestClient

    from clipkd.teachers import load_clip

    from .conftest import write_cnclip

    tsv, _ = write_cnclip(tmp_path, tiny_world)
    torch.manual_seed(0)
    spec = load_clip("cn_clip:RN50@random").save(tmp_path / "cn")
    ix = build_index(spec, tsv, tmp_path / "ix", device="cpu", workers=0, progress=False)
    assert len(ix) == 6 and ix.info["skipped"] == 1 and all("#" in p for p in ix.paths)  # 6 images + 1 broken
    hits = ix.search(text="一个红色的圆形", k=3)
    assert len(hits) == 3 and hits[0]["path"].startswith(tsv.name + "#")
    first = ix.open_image(hits[0]["id"])
    assert first.size[0] > 0
    client = TestClient(create_app(SearchIndex(tmp_path / "ix")))
    r = client.get(f"/images/{hits[0]['id']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"  # a TSV row, re-encoded
    assert client.post("/search", json={"text": "一只蓝色的星星", "k": 2}).json()["results"][0]["id"] >= 0


def test_every_stored_image_is_served_as_jpeg_or_png(teacher_spec, tmp_path):
    """The seed's downloader (and most clients) save only JPEG and PNG; WebP, BMP, GIF and TIFF files were sent as
    they are and dropped there."""
    import io

    from fastapi.testclient import TestClient

    from clipkd.search.service import create_app

    for i, fmt in enumerate(("webp", "bmp", "gif", "tiff", "png", "jpeg")):
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.new("RGB", (20, 16), (40 * i, 100, 200)).save(tmp_path / "imgs" / f"x{i}.{fmt}")
    ix = build_index(teacher_spec, tmp_path / "imgs", tmp_path / "ix", device="cpu", workers=0, progress=False)
    client = TestClient(create_app(SearchIndex(ix.root)))
    for row, path in enumerate(ix.paths):
        r = client.get(f"/images/{row}")
        kind = r.headers["content-type"]
        assert r.status_code == 200 and kind in ("image/jpeg", "image/png"), (path, kind)
        assert Image.open(io.BytesIO(r.content)).format == kind.split("/")[1].upper(), path
        assert Image.open(io.BytesIO(r.content)).size == (20, 16)


# --- no 5xx from any request: property-based fuzzing of every route over loopback HTTP (bounded in count and time)

@pytest.fixture(scope="module")
def live(index):
    """The app served by uvicorn on loopback (the real HTTP stack, not the in-process test client)."""
    import httpx

    from tests.conftest import serve_on_loopback

    with serve_on_loopback(create_app(SearchIndex(index.root))) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


def _fuzz_values():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=True)
               | st.text(max_size=30) | st.sampled_from(["1e400", "-0", "²", "NaN", "", "a red circle"]))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                       max_size=4), max_leaves=12)


FIELDS = ["text", "image", "id", "k", "num_images", "num_result_ids", "embedding_input", "modality", "deduplicate",
          "indice_name", "use_mclip", "use_safety_model", "image_url", "aesthetic_score"]


def _check(live, r) -> None:
    assert r.status_code < 500, (r.status_code, r.request.method, str(r.request.url)[:200], r.text[:300])
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        detail = r.json().get("detail")
        assert detail is None or "object at 0x" not in str(detail)  # no object reprs


def test_fuzzed_json_bodies_never_get_a_5xx(live):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    body = st.dictionaries(st.sampled_from(FIELDS), _fuzz_values(), max_size=5) | _fuzz_values()

    @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(route=st.sampled_from(["/search", "/knn-service"]), body=body)
    def one(route, body):
        import json

        _check(live, live.post(route, content=json.dumps(body, allow_nan=True), headers={
            "content-type": "application/json"}))

    one()
    assert live.get("/health").json()["status"] == "ok"


def test_fuzzed_raw_bodies_paths_queries_and_headers_never_get_a_5xx(live):
    from urllib.parse import quote

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)

    @settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(raw=st.binary(max_size=300), ctype=st.sampled_from(["application/json", "multipart/form-data",
                                                               "multipart/form-data; boundary=x", "text/plain", ""]),
           route=st.sampled_from(["/search", "/knn-service"]))
    def bodies(raw, ctype, route):
        _check(live, live.post(route, content=raw, headers={"content-type": ctype} if ctype else {}))

    @settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(row=st.text(max_size=12), thumb=st.text(max_size=6), host=header_text, extra=header_text)
    def gets(row, thumb, host, extra):
        headers = {"host": host.strip() or "x", "x-anything": extra.strip()}  # what HTTP allows in a value
        for path in (f"/images/{quote(row, safe='')}?thumb={quote(thumb, safe='')}", f"/health?{quote(extra)}",
                     "/indices-list", f"/{quote(row, safe='')}"):
            _check(live, live.get(path, headers=headers))

    bodies()
    gets()
    assert live.get("/health").json()["status"] == "ok"


def test_cli_source_writes_the_selection_its_png_and_the_next_step(teacher_spec, tiny_world, tmp_path, capsys):
    """`clipkd source` end to end on the command line (what it selects is measured in test_mission.py)."""
    out = tmp_path / "sourced"
    assert main(["source", "--teacher", teacher_spec, "--pool", str(tiny_world / "test"), "--classes",
                 str(tiny_world / "train"), "--per-class", "2", "--out", str(out), "--device", "cpu",
                 "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert (out / "selected.png").is_file() and (out / "index" / "store" / "manifest.json").is_file()
    sheet = np.asarray(Image.open(out / "selected.png").convert("RGB"), np.int16)
    coloured = (sheet.max(-1) - sheet.min(-1) > 60).mean()  # the pool's coloured shapes, not only captions
    assert coloured > 0.005, coloured
    rows = (out / "selected.csv").read_text().splitlines()
    assert rows[0] == "path,label,similarity" and 1 < len(rows) <= 1 + 2 * 16
    assert f"--extra-images {out / 'selected.csv'} --extra-store {out / 'index' / 'store'}" in printed
    summary = json.loads((out / "summary.json").read_text())
    kept = {c: v["kept"] for c, v in summary["classes"].items()}
    assert sum(kept.values()) == summary["selected"] == len(rows) - 1 and max(kept.values()) <= 2
    assert all(v["text"] + v["image_space"] >= v["kept"] for v in summary["classes"].values())
    with pytest.raises(SystemExit) as e:  # neither --prompts nor --classes: argparse's usage error
        main(["source", "--teacher", teacher_spec, "--pool", str(tiny_world / "test"), "--out", str(out)])
    assert e.value.code == 2
    from clipkd.search.source import source_pool

    with pytest.raises(ClipkdError, match="`per_class` must be ≥ 1"):  # before anything is embedded
        source_pool(teacher_spec, tiny_world / "test", tmp_path / "other", classes=tiny_world / "train", per_class=0)
    assert not (tmp_path / "other").exists()


def test_an_index_moves_with_its_images_and_serves_from_another_root(tiny_world, teacher_spec, tmp_path, capsys):
    """index.json used to name the model and every row by absolute path: an index copied to a server found neither.
    Now nothing in the folder names the build machine's paths; after `mv` of the site (index, images, model) search,
    the image route, add and remove work; copied without its images it is pointed at them (`--images`), and a root
    that is missing or lacks most rows is one line before serving."""
    import shutil

    from fastapi.testclient import TestClient

    from clipkd.teachers import load_clip

    site = tmp_path / "site"
    shutil.copytree(tiny_world / "test", site / "shop")
    spec = load_clip(teacher_spec).save(site / "teacher")  # the model lives beside the index, by absolute path
    assert main(["-q", "index", "build", "--model", spec, "--images", str(site / "shop"), "--out",
                 str(site / "index"), "--device", "cpu", "--workers", "0"]) == 0
    for f in (site / "index").rglob("*"):
        if f.is_file():
            assert str(site).encode() not in f.read_bytes(), f  # no absolute path of the building machine
    moved = tmp_path / "elsewhere" / "site"
    moved.parent.mkdir()
    shutil.move(site, moved)
    ix = SearchIndex(moved / "index")
    query = sorted((moved / "shop").rglob("*.png"))[5]
    hits = ix.search(image=query, k=3)
    assert hits[0]["path"] == query.relative_to(moved / "shop").as_posix() and hits[0]["label"]
    c = TestClient(create_app(moved / "index"))
    assert c.get(f"/images/{hits[0]['id']}").content == query.read_bytes()
    assert main(["-q", "search", "--index", str(moved / "index"), "--text", "a red circle", "--device", "cpu"]) == 0
    (moved / "shop" / "new").mkdir()
    shutil.copy(query, moved / "shop" / "new" / "copy.png")
    assert main(["-q", "index", "add", "--index", str(moved / "index"), "--images", str(moved / "shop" / "new"),
                 "--device", "cpu", "--workers", "0"]) == 0
    grown = SearchIndex(moved / "index")
    assert len(grown) == len(ix) + 1 and "new/copy.png" in grown.paths
    assert remove_from_index(moved / "index", [str(moved / "shop" / "new" / "copy.png")]) == 1
    # the index alone on a server, its images elsewhere there
    server = tmp_path / "server"
    shutil.copytree(moved / "index", server / "index")
    shutil.copytree(moved / "teacher", server / "teacher")
    with pytest.raises(ClipkdError, match="are not at .*--images ROOT"):
        create_app(server / "index")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipkdError, match=r"of \d+ sampled images .* are not under .*wrong `--images` root"):
        create_app(SearchIndex(server / "index", tmp_path / "empty"))
    c = TestClient(create_app(server / "index", images=moved / "shop"))
    assert c.get(f"/images/{hits[0]['id']}").content == query.read_bytes()
    capsys.readouterr()
    assert main(["serve", "--index", str(server / "index"), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "are not at" in err[0], err


def test_filters_restrict_results_to_a_label_or_any_column_of_the_image_list(tiny_world, teacher_spec, tmp_path,
                                                                             capsys):
    """A shop searches within a category: `label` and `where` (any extra column of the image list) on /search and
    `clipkd search --label / --where`; exact on a flat index, and on HNSW the same top-k as an exact filtered search;
    nothing matching is no results (200); an unknown column is one line (400); /knn-service keeps its protocol."""
    import csv

    from fastapi.testclient import TestClient

    files = sorted((tiny_world / "test").rglob("*.png"))
    with (tmp_path / "shop.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "brand", "price"])
        for i, p in enumerate(files):
            w.writerow([str(p), p.parent.name, "acme" if i % 3 == 0 else "other", f"{10 + i % 2}"])
    flat = build_index(teacher_spec, tmp_path / "shop.csv", tmp_path / "flat", device="cpu", workers=0,
                       progress=False)
    acme = {files[i].relative_to(tiny_world / "test").as_posix() for i in range(0, len(files), 3)}
    hits = flat.search(text="a red circle", k=100, where={"brand": "acme"})
    assert {h["path"] for h in hits} == acme
    label = files[4].parent.name
    hits = flat.search(text="a red circle", k=5, label=label, where={"price": "10"})
    assert hits and all(h["label"] == label and h["path"].startswith(label) for h in hits)
    assert flat.search(text="a red circle", k=5, where={"brand": "nobody"}) == []
    with pytest.raises(ClipkdError, match="no column 'colour' to filter on .*brand, price"):
        flat.search(text="x", where={"colour": "red"})
    # HNSW: the filtered search gives what an exact search over the matching rows gives
    hnsw = build_index(teacher_spec, tmp_path / "shop.csv", tmp_path / "hnsw", kind="hnsw", device="cpu", workers=0,
                       progress=False)
    for where in ({"brand": "acme"}, {"brand": "other"}, {"price": "11"}):
        q = hnsw.embed_text(["a green star"])
        allowed = hnsw.allowed(where=where)
        got = hnsw.search_vectors(q, 5, allowed)[1][0]
        want = hnsw.backend._exact(q, 5, allowed)[1][0]
        assert list(got) == list(hnsw.rows[want]), where
    c = TestClient(create_app(tmp_path / "flat"))
    r = c.post("/search", json={"text": "a red circle", "k": 50, "where": {"brand": "acme"}})
    assert r.status_code == 200 and len(r.json()["results"]) == len(acme)
    assert c.post("/search", json={"text": "x", "where": {"brand": "nobody"}}).json()["results"] == []
    r = c.post("/search", json={"text": "x", "where": {"colour": "red"}})
    assert r.status_code == 400 and "no column 'colour'" in r.json()["detail"]
    assert c.post("/search", json={"text": "x", "where": ["brand"]}).status_code == 400
    r = c.post("/search", files={"image": ("q.png", files[0].read_bytes(), "image/png")}, data={"label": label})
    assert r.status_code == 200 and all(h["label"] == label.replace("_", " ") or h["label"] == label
                                        for h in r.json()["results"])
    assert len(c.post("/knn-service", json={"text": "a red circle", "num_images": 3, "deduplicate": False}).json()) == 3
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "flat"), "--text", "a red circle", "--where", "brand=acme",
                 "--k", "3", "--device", "cpu"]) == 0
    assert len([ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]) == 3
    assert main(["search", "--index", str(tmp_path / "flat"), "--text", "x", "--where", "colour=red"]) == 2
    assert "no column 'colour'" in capsys.readouterr().err


TOKEN = "t0ken-for-the-tests-only-0123456789"


def _expected(root, queries, k=5):
    """What generation ``g`` answers for each query row: exact search over its live rows (a flat index)."""
    ix = SearchIndex(root)
    ix.encoder = None
    out = {}
    for q in queries:
        hits = ix.hits(*(x[0] for x in ix.search_vectors(ix.vector(q)[None], k)))
        out[q] = ([h["id"] for h in hits], [round(h["score"], 4) for h in hits])
    return ix.generation, out


def test_a_serving_index_swaps_generations_and_no_answer_mixes_two(tiny_world, teacher_spec, tmp_path):
    """8 clients query a running server (by id over /search, by embedding over /knn-service) while the index
    changes 5 times (add, remove, remove, compact, add back): every request succeeds, the server moves to each new
    generation within seconds, and every answer is exactly what the generation it names holds."""
    import httpx

    from clipkd.search.writers import compact_index
    from tests.conftest import serve_on_loopback

    root = tmp_path / "ix"
    build_index(teacher_spec, tiny_world / "val", root, kind="flat", device="cpu", workers=0, progress=False)
    first = SearchIndex(root)
    queries = [int(r) for r in first.rows[-4:]]  # never removed
    expected = dict([_expected(root, queries)])
    answers, errors, stop = [], [], threading.Event()
    app = create_app(root, reload_s=0.2)

    with serve_on_loopback(app) as url:
        def client(n):
            with httpx.Client(base_url=url, timeout=60) as c:
                i = 0
                while not stop.is_set():
                    q = queries[(n + i) % len(queries)]
                    i += 1
                    try:
                        if i % 2:
                            r = c.post("/search", json={"id": q, "k": 5})
                            body = r.json()
                            got = (body["generation"], [h["id"] for h in body["results"]],
                                   [round(h["score"], 4) for h in body["results"]])
                        else:
                            r = c.post("/knn-service", json={"embedding_input": first.vector(q).tolist(),
                                                             "num_images": 5, "deduplicate": False})
                            got = (int(r.headers["x-clipkd-generation"]), [h["id"] for h in r.json()],
                                   [round(h["similarity"], 4) for h in r.json()])
                        answers.append((q, r.status_code, *got))
                    except Exception as e:  # noqa: BLE001 - a failed request is what the test is for
                        errors.append(repr(e))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        [t.start() for t in threads]
        removable = [first.paths[int(r)] for r in first.rows[:6]]
        lst = tmp_path / "back.txt"
        lst.write_text("".join(f"{first.images_root / p}\n" for p in removable[:3]))
        updates = [
            lambda: main(["-q", "index", "add", "--index", str(root), "--images", str(tiny_world / "test"),
                          "--device", "cpu", "--workers", "0"]),
            lambda: remove_from_index(root, removable[:3]),
            lambda: remove_from_index(root, removable[3:]),
            lambda: compact_index(root),
            lambda: main(["-q", "index", "add", "--index", str(root), "--images", str(lst), "--device", "cpu",
                          "--workers", "0"]),
        ]
        for update in updates:
            time.sleep(0.5)
            update()
            gen, want = _expected(root, queries)
            expected[gen] = want
            deadline = time.time() + 10
            while httpx.get(f"{url}/health").json()["generation"] != gen:
                assert time.time() < deadline, f"the server did not pick up generation {gen}"
                time.sleep(0.05)
        time.sleep(0.5)
        stop.set()
        [t.join(timeout=60) for t in threads]
        metrics = httpx.get(f"{url}/metrics").text
    assert not errors, errors[:3]
    assert len(expected) == 6 and len(answers) > 50
    seen = {a[2] for a in answers}
    assert len(seen) >= 4, seen  # the clients were answered by most of the generations
    for q, status, gen, ids, scores in answers:
        assert status == 200, (q, status)
        want_ids, want_scores = expected[gen][q]
        assert np.allclose(scores, want_scores, atol=2e-3) and (ids == want_ids or sorted(ids) == sorted(want_ids)), \
            (gen, q, ids, want_ids)
    assert 'clipkd_index_reloads_total 5.0' in metrics and 'route="/search",status="200"' in metrics


def test_index_changing_routes_need_the_token_and_say_what_is_wrong(teacher_spec, tiny_world, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from clipkd.fileio import exclusive

    shop = tmp_path / "shop"
    shutil.copytree(tiny_world / "val", shop / "old")
    root = tmp_path / "ix"
    build_index(teacher_spec, shop, root, device="cpu", workers=0, progress=False)
    off = TestClient(create_app(root, reload_s=0))
    assert off.post("/index/remove", json={"ids": [0]}).status_code == 403
    c = TestClient(create_app(root, reload_s=0, token=TOKEN))
    assert c.post("/index/remove", json={"ids": [0]}).status_code == 401
    r = c.post("/index/remove", json={"ids": [0]}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["detail"].startswith("this route changes the index")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for body, code in [({}, 400), ({"ids": []}, 400), ({"ids": ["x"]}, 400), ({"ids": [10 ** 9]}, 404),
                       ({"paths": ["nope.png"]}, 404), ({"ids": [0], "paths": ["a"]}, 400),
                       # only the index's own keys count: never a file resolved against the server's folder
                       ({"paths": [str(shop / "old" / sorted(os.listdir(shop / "old"))[0])]}, 404),
                       ({"paths": ["../../../etc/passwd"]}, 404), ({"paths": [3]}, 400)]:
        r = c.post("/index/remove", json=body, headers=auth)
        assert r.status_code == code and "\n" not in r.json()["detail"], (body, r.status_code, r.text)
        assert "etc" not in r.json()["detail"] and str(tmp_path) not in r.json()["detail"], r.text
        assert "index the index" not in r.json()["detail"], r.text
    gen = c.get("/health").json()["generation"]
    r = c.post("/index/remove", json={"ids": [0, 1]}, headers=auth)
    assert r.status_code == 200 and r.json()["changed"] == 2 and r.json()["generation"] == gen + 1
    assert c.get("/health").json()["generation"] == gen + 1  # answered once the server serves it
    r = c.post("/search", json={"id": 0})
    assert r.status_code == 404 and r.json()["detail"] == "image 0 was removed from this index"
    ids = {h["id"] for h in c.post("/search", json={"id": 2, "k": 100}).json()["results"]}
    assert not ids & {0, 1}
    r = c.get("/images/0")
    assert r.status_code == 404 and r.json()["detail"] == "image 0 was removed from this index", r.text
    r = c.post("/index/remove", json={"ids": [0]}, headers=auth)
    assert r.status_code == 404 and r.json()["detail"] == "image 0 was removed from this index", r.text
    key = SearchIndex(root).paths[5]  # a key as the index lists it (relative to the collection root) is taken
    r = c.post("/index/remove", json={"paths": [key]}, headers=auth)
    assert r.status_code == 200 and r.json()["changed"] == 1, r.text
    with exclusive(root, "search index"):  # another clipkd process is changing it
        r = c.post("/index/remove", json={"ids": [3]}, headers=auth)
        assert r.status_code == 409 and "in use by another" in r.json()["detail"]
    for body, code in [({"images": "/etc"}, 400), ({"images": "../../"}, 400), ({"images": "nope"}, 404),
                       ({"images": 3}, 400)]:
        assert c.post("/index/add", json=body, headers=auth).status_code == code, body
    shutil.copytree(tiny_world / "test" / "red_circle", shop / "new" / "red_circle")
    n = c.get("/health").json()["images"]
    r = c.post("/index/add", json={"images": "new"}, headers=auth)
    assert r.status_code == 200 and r.json()["changed"] == 3 and c.get("/health").json()["images"] == n + 3, r.text
    assert "clipkd_requests_total" in c.get("/metrics").text


def test_serve_token_and_workers_are_checked_before_serving(index, tmp_path, capsys, monkeypatch):
    short = tmp_path / "token"
    short.write_text("abc\n")
    assert main(["serve", "--index", str(index.root), "--token-file", str(short)]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main(["serve", "--index", str(index.root), "--token-file", str(tmp_path / "none")]) == 2
    assert "cannot read the token file" in capsys.readouterr().err
    monkeypatch.setenv("CLIPKD_TOKEN", "")
    assert main(["serve", "--index", str(index.root)]) == 2
    assert "CLIPKD_TOKEN holds a token of 0" in capsys.readouterr().err
    monkeypatch.delenv("CLIPKD_TOKEN")
    assert main(["serve", "--index", str(index.root), "--port", "99999"]) == 2  # once an OverflowError traceback
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "port must be from 1 to 65535" in err, repr(err)
    import socket

    with socket.socket() as taken:  # another server holds the port: one line, before the index and model load
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--index", str(index.root), "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"cannot listen on 127.0.0.1:{port}: the address is in use" in err, err
        assert "serving" not in err


def test_serve_with_workers_checks_the_index_in_a_process_of_its_own(index, tmp_path, monkeypatch):
    """``serve --workers N`` builds the app once before any worker starts, in a spawned process: its one-line errors
    reach the user, while the supervising process never opens the index (it held the index and the model beside
    the workers before)."""
    import socket

    from clipkd.search import service

    monkeypatch.setattr(SearchIndex, "__init__", lambda *a, **k: (_ for _ in ()).throw(AssertionError("opened")))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ClipkdError, match=r"^the images of index .* are not at .*nowhere: give the folder"):
        service.serve(index.root, port=port, workers=2, images=tmp_path / "nowhere")
    with pytest.raises(ClipkdError, match="no index at|not an index|index.json"):
        service.serve(tmp_path / "empty", port=port, workers=2)


def test_serve_with_workers_swaps_every_worker_and_sums_their_metrics(tiny_world, teacher_spec, tmp_path):
    """``serve --workers 2``: two processes answer; after an ``index remove`` every one of them serves the new
    generation, and /metrics counts the requests of both."""
    import os
    import socket
    import subprocess
    import sys

    import httpx

    from tests.conftest import cli_env

    root = tmp_path / "ix"
    build_index(teacher_spec, tiny_world / "val", root, device="cpu", workers=0, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "clipkd.cli", "serve", "--index", str(root), "--port", str(port),
                             "--workers", "2", "--reload-s", "0.2"], env={**os.environ, **cli_env()},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                gen = httpx.get(f"{url}/health", timeout=5).json()["generation"]
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "slow"
                time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(20):
                assert c.post("/search", json={"id": 1, "k": 3}).status_code == 200
            workers = {}
            for _ in range(400):  # fresh connections until both workers have answered
                h = httpx.get(f"{url}/health", timeout=5).json()
                workers[h["worker"]] = h["generation"]
                if len(workers) == 2:
                    break
            assert len(workers) == 2, workers
            remove_from_index(root, [SearchIndex(root).paths[0]])
            deadline = time.time() + 20
            while set(workers.values()) != {gen + 1}:
                assert time.time() < deadline, f"not every worker moved to the new generation: {workers}"
                h = httpx.get(f"{url}/health", timeout=5).json()
                workers[h["worker"]] = h["generation"]
            metrics = c.get("/metrics").text
        line = next(m for m in metrics.splitlines() if m.startswith('clipkd_requests_total{route="/search"'))
        assert float(line.split()[-1]) == 20.0, line  # both workers' requests (the kernel spreads connections)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_ivf_index_is_searched_memory_mapped_and_still_takes_adds_and_removals(tiny_world, teacher_spec, tmp_path):
    import faiss

    root = tmp_path / "ivf"
    build_index(teacher_spec, tiny_world / "val", root, kind="ivf", device="cpu", workers=0, progress=False)
    ix = SearchIndex(root)
    lists = type(faiss.downcast_InvertedLists(ix.index.invlists)).__name__
    assert lists == "OnDiskInvertedLists", lists  # the file's lists mapped, not copied into memory
    n = len(ix)
    assert main(["-q", "index", "add", "--index", str(root), "--images", str(tiny_world / "test"), "--device", "cpu",
                 "--workers", "0"]) == 0
    grown = SearchIndex(root)
    assert len(grown) == n + 48 and grown.info["kind"] == "ivf" and list(grown.rows[:n]) == list(ix.rows)
    gone = int(grown.rows[-1])
    remove_from_index(root, [grown.paths[gone]])
    after = SearchIndex(root)
    _, rows = after.search_vectors(grown.vector(gone)[None], 5)
    assert gone not in rows[0] and (rows[0] >= 0).all()


def test_serve_threads_share_the_cores_between_workers(index, monkeypatch):
    """`threads` sets ONNX Runtime's and FAISS's threads of a server process (a bad value is one line, before any
    loading); `serve --workers 2` on two cores gives each worker one."""
    import faiss

    from clipkd import onnxfile
    from clipkd.search import service

    before = faiss.omp_get_max_threads()
    try:
        create_app(SearchIndex(index.root), reload_s=0, threads=1)
        assert onnxfile.THREADS == 1 and faiss.omp_get_max_threads() == 1
        with pytest.raises(ClipkdError, match="`threads` must be a whole number of at least 1, got 0"):
            create_app(index.root, reload_s=0, threads=0)
    finally:
        onnxfile.set_threads(None)
        faiss.omp_set_num_threads(before)
    seen = {}
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(service.app, "create_app", lambda index, **kw: seen.update(kw) or (_ for _ in ()).throw(
        SystemExit(0)))
    monkeypatch.setattr(service.app, "check_apart", lambda index, kw: seen.update(kw) or (_ for _ in ()).throw(
        SystemExit(0)))  # several workers: the app is built in a process of its own, with these arguments
    with pytest.raises(SystemExit):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        service.serve(index.root, port=port, workers=2)
    assert seen["threads"] == 1
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        service.serve(index.root, port=port)
    assert seen["threads"] == 2 and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # one worker: every core, sleeping
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("CLIPKD_SPIN", "1")  # the libraries' own spinning threads, as an operator may want them
    with pytest.raises(SystemExit):
        service.serve(index.root, port=port)
    assert "OMP_WAIT_POLICY" not in os.environ


def test_server_sessions_sleep_between_runs_unless_they_spin(tmp_path, monkeypatch):
    """With a server's threads set, an image model's ONNX Runtime threads sleep between runs, the text tower's spin
    (``spin=True``), and ``CLIPKD_SPIN=1`` makes every session spin; without a server's setting, ONNX Runtime's
    own defaults hold."""
    import onnx
    from onnx import TensorProto, helper

    from clipkd import onnxfile

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key=onnxfile.META_KEY, value=json.dumps(
        {"format": onnxfile.ONNX_FORMAT, "preprocess": {}, "kind": "image_embedding", "out_dim": 4}))
    onnx.save(model, tmp_path / "m.onnx")

    def spinning(spin: bool = False) -> str:
        opts = onnxfile.open_session(tmp_path / "m.onnx", "cpu", spin=spin)[0].get_session_options()
        return opts.get_session_config_entry("session.intra_op.allow_spinning"), opts.intra_op_num_threads

    monkeypatch.delenv("CLIPKD_SPIN", raising=False)
    try:
        onnxfile.set_threads(2)
        assert spinning() == ("0", 2) and spinning(spin=True) == ("1", 2)
        monkeypatch.setenv("CLIPKD_SPIN", "1")
        assert spinning() == ("1", 2)
    finally:
        onnxfile.set_threads(None)


def test_faults_under_load_disconnect_slow_client_and_a_burst(index, tiny_world, monkeypatch):
    """A client that hangs up mid-upload and one that sends its body too slowly are each answered for (499, 408)
    while the others keep being served; a burst of 1,000 requests is answered in full, each with its results or a
    503 + Retry-After when the queue is full (never left waiting); /metrics counts each outcome."""
    import asyncio
    import socket as sk
    from urllib.parse import urlparse

    import httpx

    from clipkd.search.service import batcher, requests
    from tests.conftest import serve_on_loopback

    monkeypatch.setattr(requests, "BODY_TIMEOUT_S", 1.0)
    app = create_app(SearchIndex(index.root), reload_s=0)
    app.state.service.batcher.max_queue = 8
    img = sorted((tiny_world / "test").rglob("*.png"))[0].read_bytes()
    with serve_on_loopback(app) as url:
        host, port = urlparse(url).hostname, urlparse(url).port
        head = (b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n")
        with sk.create_connection((host, port)) as gone:  # hangs up after part of its body
            gone.sendall(head + b'{"text": "a red')
        slow = sk.create_connection((host, port))  # sends a byte, then nothing: held past the body timeout
        slow.sendall(head + b"{")
        assert httpx.post(f"{url}/search", json={"text": "a red circle"}).status_code == 200  # others served
        slow.settimeout(10)
        assert slow.recv(4096).startswith(b"HTTP/1.1 408")
        slow.close()
        monkeypatch.setattr(requests, "BODY_TIMEOUT_S", 30.0)  # the burst's bodies wait for a busy event loop

        async def burst() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=120, limits=limits) as c:
                jobs = [c.post(f"{url}/search", files={"image": ("q.png", img, "image/png")}) if i % 4 == 0 else
                        c.post(f"{url}/search", json={"id": i % len(index), "k": 5}) for i in range(1000)]
                return await asyncio.gather(*jobs)

        answers = asyncio.run(burst())
        codes = [r.status_code for r in answers]
        assert len(codes) == 1000 and set(codes) <= {200, 503}, set(codes)
        assert codes.count(200) >= 750  # every id query, and the image queries the queue took
        busy = [r for r in answers if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" and "busy" in r.json()["detail"] for r in busy)
        metrics = httpx.get(f"{url}/metrics").text
    assert 'route="/search",status="499"} 1.0' in metrics and 'route="/search",status="408"} 1.0' in metrics
    assert f'route="/search",status="200"}} {codes.count(200) + 1}.0' in metrics
    assert (f'route="/search",status="503"}} {len(busy)}.0' in metrics) if busy else "status=\"503\"" not in metrics
    assert batcher.MAX_QUEUE == 512  # the default the test lowered on this one app


@pytest.mark.parametrize("thaw", [True, False])
def test_a_frozen_server_still_frees_an_old_generation(tiny_world, teacher_spec, tmp_path, thaw):
    """``serve`` freezes what it loaded out of the collector's full passes (gc.freeze); a generation switch gives
    everything back to the collector, so the old generation is freed (its store dies in a reference cycle, which a
    frozen heap never frees: without the thaw it stays), and the new one is frozen once the switch has settled."""
    import gc
    import weakref

    root = tmp_path / "ix"
    build_index(teacher_spec, tiny_world / "val", root, kind="flat", device="cpu", workers=0, progress=False)
    try:
        app = create_app(root, reload_s=0, freeze_gc=True)
        heap = app.state.heap
        assert gc.get_freeze_count() > 0
        old = weakref.ref(app.state.service.index.store)
        remove_from_index(root, [SearchIndex(root).paths[0]])
        if not thaw:
            heap.thaw = lambda: None  # what a server that froze once and never thawed would do
        heap.settle_s = 0
        assert app.state.reloader.check()
        heap.tick()  # settled: collect, freeze again
        assert (old() is None) == thaw
        assert gc.get_freeze_count() > 0 and heap.due is None
    finally:
        gc.unfreeze()
