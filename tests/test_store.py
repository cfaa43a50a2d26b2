import json

import numpy as np
import pytest

from clipkd.errors import ClipkdError
from clipkd.store import EmbeddingStore, embed_images

from .conftest import FakeTeacher, write_image


def _folder(root, n=23):
    for i in range(n):
        write_image(root / f"c{i % 3}" / f"{i:03d}.png", colour=(10 * i, 100, 255 - 10 * i))
    return root


def test_store_roundtrip(tmp_path, fake_teacher):
    imgs = _folder(tmp_path / "imgs")
    store = embed_images(fake_teacher, imgs, tmp_path / "store", batch_size=4, workers=0, shard_size=8)
    assert len(store) == 23 and len(store.manifest["shards"]) == 3
    emb = store.embeddings()
    assert emb.dtype == np.float16 and emb.shape == (23, 8)
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1, atol=1e-2)
    m = store.manifest
    assert m["teacher"] == fake_teacher.identity and m["embed_dim"] == 8 and m["normalized"] == "l2"
    # rows line up with paths
    rows = store.rows(["c1/001.png", "nope.png"])
    assert rows[1] == -1
    from PIL import Image

    x = fake_teacher.preprocess(Image.open(imgs / "c1/001.png").convert("RGB")).unsqueeze(0)
    assert np.allclose(emb[rows[0]], fake_teacher.encode_image(x)[0].numpy(), atol=2e-3)


def test_resume_after_interruption_matches_a_single_run(tmp_path):
    imgs = _folder(tmp_path / "imgs")
    full = embed_images(FakeTeacher(), imgs, tmp_path / "full", batch_size=4, workers=0, shard_size=8)
    t = FakeTeacher()
    # "killed" after 10 images: one finished shard (8) survives, the partial one is not recorded
    embed_images(t, imgs, tmp_path / "part", batch_size=4, workers=0, shard_size=8, max_images=10)
    part = EmbeddingStore(tmp_path / "part")
    assert len(part) == 10  # max_images flushes what it has; emulate a kill by dropping the last shard
    manifest = json.loads((tmp_path / "part" / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]
    manifest["count"] = 8
    (tmp_path / "part" / "manifest.json").write_text(json.dumps(manifest))
    t2 = FakeTeacher()
    resumed = embed_images(t2, imgs, tmp_path / "part", batch_size=4, workers=0, shard_size=8)
    assert t2.calls == 23 - 8  # finished shard not recomputed
    assert sorted(resumed.paths) == sorted(full.paths)
    a = dict(zip(full.paths, full.embeddings(), strict=True))
    b = dict(zip(resumed.paths, resumed.embeddings(), strict=True))
    assert all(np.array_equal(a[p], b[p]) for p in a)
    # nothing new: no work at all
    t3 = FakeTeacher()
    embed_images(t3, imgs, tmp_path / "part", workers=0)
    assert t3.calls == 0


def test_corrupt_files_are_skipped_and_counted(tmp_path, fake_teacher):
    imgs = _folder(tmp_path / "imgs", n=6)
    (imgs / "c0" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (imgs / "c1" / "truncated.png").write_bytes((imgs / "c1" / "001.png").read_bytes()[:40])
    store = embed_images(fake_teacher, imgs, tmp_path / "store", batch_size=4, workers=0)
    assert len(store) == 6
    m = store.manifest
    assert m["skipped_count"] == 2
    assert {s["path"] for s in m["skipped"]} == {"c0/broken.jpg", "c1/truncated.png"}
    assert all(s["error"] for s in m["skipped"])


def test_other_teacher_is_refused(tmp_path, fake_teacher):
    imgs = _folder(tmp_path / "imgs", n=4)
    embed_images(fake_teacher, imgs, tmp_path / "store", workers=0)
    write_image(imgs / "c0" / "new.png")
    with pytest.raises(ClipkdError, match="holds embeddings of teacher 'fake:teacher@v1'"):
        embed_images(FakeTeacher(identity="fake:other@v2"), imgs, tmp_path / "store", workers=0)


def test_empty_or_missing_folder(tmp_path, fake_teacher):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipkdError, match="no image files"):
        embed_images(fake_teacher, tmp_path / "empty", tmp_path / "s", workers=0)
    with pytest.raises(ClipkdError, match="image folder not found"):
        embed_images(fake_teacher, tmp_path / "missing", tmp_path / "s", workers=0)
    with pytest.raises(ClipkdError, match="not an embedding store"):
        EmbeddingStore(tmp_path / "empty")


def test_prefetch_asks_the_kernel_for_every_shard(tmp_path, monkeypatch):
    """A store's prefetch advises WILLNEED on each shard file whole (what an IVF-PQ server re-ranking from it
    does at start), without reading it into the process."""
    import os

    import numpy as np

    from clipkd.store import EmbeddingStore, ShardWriter, new_manifest

    out = tmp_path / "store"
    out.mkdir()
    w = ShardWriter(out, new_manifest({"teacher": "t", "embed_dim": 4, "preprocess": {}}, tmp_path, 3, out), 3)
    w.add(np.eye(4, dtype=np.float16)[[0, 1, 2]], [f"{i}.jpg" for i in range(3)], [1] * 3)
    w.add(np.eye(4, dtype=np.float16)[[3, 0]], ["3.jpg", "4.jpg"], [1] * 2)
    w.flush(final=True)
    store = EmbeddingStore(out)
    seen = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: seen.append((off, n, advice)),
                        raising=False)
    asked = store.prefetch()
    shards = store.manifest["shards"]
    assert len(shards) == 2 and seen == [(0, 0, os.POSIX_FADV_WILLNEED)] * 2
    assert asked == sum((out / s["file"]).stat().st_size for s in shards)


def test_one_key_is_read_without_its_shards_other_keys(tmp_path, monkeypatch):
    """A search result's key is read alone from its shard's path list (the list is not split into strings), the
    same key a whole read gives; slices and iteration read whole lists; a list that does not match the manifest is
    one line."""
    import numpy as np

    from clipkd.errors import ClipkdError
    from clipkd.store import EmbeddingStore, ShardWriter, new_manifest

    out = tmp_path / "store"
    out.mkdir()
    w = ShardWriter(out, new_manifest({"teacher": "t", "embed_dim": 4, "preprocess": {}}, tmp_path, 3, out), 3)
    names = ["a.jpg", "b/ü.jpg", "c d.jpg", "e.jpg", "f.jpg"]
    w.add(np.eye(4, dtype=np.float16)[[0, 1, 2]], names[:3], [1] * 3)
    w.add(np.eye(4, dtype=np.float16)[[3, 0]], names[3:], [1] * 2)
    w.flush(final=True)
    store = EmbeddingStore(out)
    keys = store.keys()
    monkeypatch.setattr(EmbeddingStore, "shard_keys", lambda self, n: (_ for _ in ()).throw(AssertionError(n)))
    assert [keys.one(i) for i in range(5)] == names
    monkeypatch.undo()
    assert [keys[i] for i in range(5)] == names and keys[-1] == "f.jpg"
    assert keys[1:4] == names[1:4] and list(keys) == names
    shard = store.manifest["shards"][0]["paths"]
    (out / shard).write_text("a.jpg\nb.jpg\n")
    with pytest.raises(ClipkdError, match="lists 2 paths, manifest says 3"):
        EmbeddingStore(out).keys().one(0)
