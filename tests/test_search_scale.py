"""Search at scale, at small sizes: builds that stream the store under a memory budget, the kind chosen for the
budget, IVF-PQ re-ranked from the store, and an index opened without a Python object per row."""

from __future__ import annotations

import numpy as np
import pytest

from clipkd.cli import main
from clipkd.errors import ClipkdError
from clipkd.search import exact as exact_mod
from clipkd.search import layout, planning, writers
from clipkd.search.index import SearchIndex
from clipkd.search.planning import parse_memory, plan_index
from clipkd.search.writers import append_store, index_store
from clipkd.store import EmbeddingStore, ShardWriter, new_manifest


def _write_rows(out, enc, start: int, n: int, shard: int = 500, seed: int = 0) -> np.ndarray:
    """``n`` clustered unit vectors keyed ``start..`` appended to ``out/store`` in shards of ``shard`` rows."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(40, enc.embed_dim))
    v = centers[rng.integers(0, 40, n)] + 0.4 * rng.normal(size=(n, enc.embed_dim))
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
    store = out / "store"
    manifest = EmbeddingStore(store).manifest if (store / "manifest.json").is_file() else \
        new_manifest(enc.describe(), out / "gallery", shard, store)
    store.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(store, manifest, shard)
    for s in range(0, n, shard):
        w.add(v[s:s + shard], [f"g/{i:06d}.jpg" for i in range(start + s, start + min(n, s + shard))],
              [0] * len(v[s:s + shard]))
    w.flush(final=True)
    return v


def _no_whole_store(monkeypatch) -> list[int]:
    """Reading every row into memory, or every key into a list, fails the test."""
    def refuse(what):
        def _raise(self, *a, **k):
            raise AssertionError(f"{what} read whole")
        return _raise

    monkeypatch.setattr(EmbeddingStore, "embeddings", refuse("embeddings"))
    monkeypatch.setattr(EmbeddingStore, "paths", property(refuse("paths")))
    monkeypatch.setattr(writers, "CHUNK", 256)  # several chunks, crossing the 500-row shards
    steps: list[int] = []
    chunks = EmbeddingStore.chunks

    def counted(self, rows=None, size=65_536):
        steps.append(size)
        return chunks(self, rows, size)

    monkeypatch.setattr(EmbeddingStore, "chunks", counted)
    return steps


def test_an_ivfpq_build_streams_the_store_and_serves_rows_without_holding_them(teacher_spec, tmp_path, monkeypatch):
    from clipkd.search.encoder import load_encoder

    enc = load_encoder(teacher_spec, device="cpu")
    out = tmp_path / "ix"
    v = _write_rows(out, enc, 0, 6000)
    # labels for some rows: coded per row into the generation, not read back as a dict by a server
    (out / "labels.tsv").write_text("".join(f"g/{i:06d}.jpg\t{'odd' if i % 2 else 'even'}\n" for i in range(3000)))
    steps = _no_whole_store(monkeypatch)
    index_store(out, teacher_spec, kind="ivfpq", device="cpu", max_memory="64M")
    assert 256 in steps  # the build did read the store in the chunks the test set
    prefetched = []
    with monkeypatch.context() as m:  # a reader (a server) codes nothing itself
        m.setattr(layout, "_read_labels", lambda p: (_ for _ in ()).throw(AssertionError("labels.tsv read")))
        m.setattr(EmbeddingStore, "prefetch", lambda self: prefetched.append(self.root) or 0)
        ix = SearchIndex(out)
    assert prefetched == [out / "store"]  # it re-ranks from the store: the kernel is asked for its pages
    info = ix.info
    assert info["kind"] == "ivfpq" and info["max_memory"] == 64 << 20
    assert planning.RERANK <= info["params"]["rerank"] <= planning.RERANK_MAX
    assert info["recall@10"] >= 0.9 and info["index_bytes"] <= 64 << 20, info
    assert (ix.root / "gen" / str(info["generation"]) / "columns.json").is_file()
    # served search re-ranks exactly: each stored row finds itself first, and recall against brute force holds
    q = v[::97].astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scores, rows = ix.search_vectors(q, 10)
    assert (rows[:, 0] == np.arange(0, 6000, 97)).all()
    want = np.argsort(-(q @ v.astype(np.float32).T), axis=1)[:, :10]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, rows, strict=True)]) >= 0.9
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    hit = ix.hits(scores[1], rows[1])[0]
    assert hit["path"] == "g/000097.jpg" and hit["label"] == "odd"
    odd = ix.allowed(label="odd")
    assert len(odd) == 1500 and all(ix.label(int(r)) == "odd" for r in ix.rows[odd][:50])
    _, rows = ix.search_vectors(q[:5], 10, allowed=odd)
    assert all(ix.label(int(r)) == "odd" for r in rows.ravel())
    # more rows appended a chunk at a time to the trained lists: no rebuild, old rows keep their positions
    _write_rows(out, enc, 6000, 1200, seed=1)
    grown = append_store(out)
    assert len(grown) == 7200 and list(grown.rows[:6000]) == list(ix.rows) and grown.info["kind"] == "ivfpq"
    assert grown.search_vectors(grown.vector(6500)[None], 1)[1][0, 0] == 6500


def test_auto_kind_and_budget_follow_the_rows_in_one_line():
    assert plan_index("auto", 20_000, 512, 1 << 30)["kind"] == "flat"
    assert plan_index("auto", 200_000, 512, 1 << 30)["kind"] == "hnsw"
    ten_m = plan_index("auto", 10_000_000, 512, 4 << 30)
    assert ten_m["kind"] == "ivfpq" and ten_m["m"] == 64 and ten_m["bytes"] <= 4 << 30
    assert plan_index("auto", 10_000_000, 512, 1 << 30)["m"] < 64  # smaller codes under a smaller budget
    with pytest.raises(ClipkdError, match=r"does not fit in `max_memory`=100 MiB: the smallest takes"):
        plan_index("auto", 10_000_000, 512, 100 << 20)
    with pytest.raises(ClipkdError, match=r"a hnsw index .* `kind`=auto"):
        plan_index("hnsw", 10_000_000, 512, 4 << 30)
    assert parse_memory("4G") == 4 << 30 and parse_memory("512M") == 512 << 20 and parse_memory("1.5GiB") == 3 << 29
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ClipkdError, match="`max_memory`="):
            parse_memory(bad)


def test_a_budget_too_small_is_refused_before_any_embedding(tiny_world, teacher_spec, tmp_path, capsys):
    out = tmp_path / "ix"
    code = main(["index", "build", "--model", str(teacher_spec), "--images", str(tiny_world / "test"), "--out",
                 str(out), "--max-memory", "1K", "--device", "cpu", "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not fit in --max-memory" in err and len(err.splitlines()) == 1, err
    assert not (out / "store" / "manifest.json").exists()


@pytest.mark.parametrize("step", [7, 12, 13, 64, None])  # chunks smaller than k, equal to it, one row more, the default
def test_exact_search_in_chunks_equals_brute_force(step):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(300, 16)).astype(np.float32)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    rows = np.arange(5, 290)
    scores, at = exact_mod.exact_search(v, rows, q, 12, step=step)
    sims = q @ v[rows].T
    want = np.argsort(-sims, axis=1)[:, :12]
    assert (at == want).all() and np.allclose(scores, np.take_along_axis(sims, want, 1))
    _, few = exact_mod.exact_search(v, rows[:3], q, 5)  # fewer rows than k: padded with -1, as FAISS pads
    assert (few[:, 3:] == -1).all() and (few[:, :3] >= 0).all()
