"""Scale-out: ranks of one job (torchrun / SLURM), stores shared by ranks, targets read on demand."""

from __future__ import annotations

import pickle
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from clipkd.distributed import my_share, owner, ranks
from clipkd.store import EmbeddingStore, ShardWriter, TargetRows, embed_images, new_manifest

from .conftest import FakeTeacher
from .test_reliability import CLI, _env, _folder


def test_ranks_come_from_torchrun_or_slurm(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert ranks().world == 1 and ranks().zero
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert (ranks().rank, ranks().world, ranks().local) == (5, 8, 1)
    monkeypatch.setenv("RANK", "3")  # torchrun's variables win when both are set
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    r = ranks()
    assert (r.rank, r.world, r.local, r.zero) == (3, 4, 3, False)
    keys = [f"img/{i}.jpg" for i in range(200)]
    parts = [[k for k in keys if owner(k, 4) == q] for q in range(4)]
    assert sorted(sum(parts, [])) == sorted(keys) and all(20 < len(p) < 80 for p in parts)
    assert my_share(keys) == parts[3]
    assert my_share(keys[:50]) == [k for k in parts[3] if k in keys[:50]]  # the split does not depend on the list


def test_writers_merging_one_manifest_never_duplicate_a_row(tmp_path):
    info = {"teacher": "fake:t@1", "embed_dim": 4, "preprocess": {}}
    out = tmp_path / "store"
    out.mkdir()
    a = ShardWriter(out, new_manifest(info, tmp_path, 2), 100)
    b = ShardWriter(out, new_manifest(info, tmp_path, 2), 100)
    rows = {p: np.full(4, i, np.float16) for i, p in enumerate("pqrs")}
    a.add(np.stack([rows["p"], rows["q"]]), ["p", "q"], [1, 1])
    b.add(np.stack([rows["q"], rows["r"]]), ["q", "r"], [1, 1])
    b.skip("bad.jpg", "OSError")
    a.flush()
    b.flush()  # q came from a meanwhile: dropped, not doubled
    a.add(rows["s"][None], ["s"], [1])
    a.flush()  # a learns of b's shard before naming its own
    st = EmbeddingStore(out)
    assert sorted(st.paths) == ["p", "q", "r", "s"] and len(st) == 4
    assert [s["file"] for s in st.manifest["shards"]] == ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    assert st.manifest["skipped_count"] == 1
    for p, v in zip(st.paths, st.embeddings(), strict=True):
        assert (v == rows[p]).all()


def test_target_rows_are_read_on_demand_across_shards(tmp_path, fake_teacher):
    imgs = _folder(tmp_path / "imgs", n=11)
    st = embed_images(fake_teacher, imgs, tmp_path / "store", batch_size=3, shard_size=4, workers=0, progress=False)
    assert len(st.manifest["shards"]) >= 2
    want = ["c1/9.png", "c0/0.png", "c0/4.png", "c1/5.png"]
    found = st.targets(want)
    full = st.embeddings()
    rows = st.rows(want)
    t = found.targets
    assert t.shape == (4, 8) and t._maps == {}  # nothing mapped until asked
    assert torch.equal(t[0], torch.from_numpy(full[rows[0]]))
    assert torch.equal(t[torch.tensor([3, 1])], torch.from_numpy(full[rows[[3, 1]]]))
    t2 = pickle.loads(pickle.dumps(t))  # a loader worker gets the recipe, not the maps
    assert t2._maps == {} and torch.equal(t2[2], t[2])
    both = TargetRows.cat([t, st.targets(["c0/2.png"]).targets])
    assert both.shape == (5, 8) and torch.equal(both[4], torch.from_numpy(full[st.rows(["c0/2.png"])[0]]))


def _embed_cmd(spec: str, imgs, store, *extra: str) -> list[str]:
    return [*CLI, "embed-images", "--teacher", spec, "--images", str(imgs), "--out", str(store), "--device", "cpu",
            "--workers", "0", *extra]


def _rank_env(rank: int, world: int) -> dict[str, str]:
    return {**_env(), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}


@pytest.fixture(scope="module")
def micro_spec(tmp_path_factory) -> str:
    from clipkd.teachers import load_clip

    return load_clip("open_clip:clipkd-micro").save(tmp_path_factory.mktemp("teacher"))


def test_two_ranks_make_the_store_one_rank_makes(tmp_path, micro_spec):
    imgs = _folder(tmp_path / "imgs", n=40)
    subprocess.run(_embed_cmd(micro_spec, imgs, tmp_path / "one"), check=True, capture_output=True, env=_env())
    cmd = _embed_cmd(micro_spec, imgs, tmp_path / "two", "--shard-size", "4", "--batch-size", "4")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_rank_env(r, 2))
             for r in range(2)]
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    one, two = EmbeddingStore(tmp_path / "one"), EmbeddingStore(tmp_path / "two")
    assert len(two) == 40 and len(set(two.paths)) == 40 and set(two.paths) == set(one.paths)
    a = np.asarray(one.embeddings(), np.float32)[one.rows(sorted(one.paths))]
    b = np.asarray(two.embeddings(), np.float32)[two.rows(sorted(one.paths))]
    assert np.abs(a - b).max() < 2e-3


def test_a_killed_rank_is_completed_by_a_rerun_with_another_rank_count(tmp_path, micro_spec):
    imgs = _folder(tmp_path / "imgs", n=120)
    store = tmp_path / "store"
    cmd = _embed_cmd(micro_spec, imgs, store, "--shard-size", "2", "--batch-size", "2")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_rank_env(1, 3))
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:
        if (store / "manifest.json").is_file() and EmbeddingStore(store).manifest["count"] >= 4:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert p.wait() == -signal.SIGKILL, "rank 1 finished before it could be killed"
    partial = len(EmbeddingStore(store))
    assert 4 <= partial < 40
    subprocess.run(cmd, check=True, capture_output=True, env=_rank_env(0, 3))  # rank 0 of 3 did its part
    subprocess.run(cmd, check=True, capture_output=True, env=_env())  # then one process finishes the job
    st = EmbeddingStore(store)
    assert len(st) == 120 and sorted(st.paths) == sorted(set(st.paths)) and st.embeddings().shape == (120, 64)


def test_fake_teacher_store_rows_follow_the_hash_split(tmp_path, monkeypatch):
    imgs = _folder(tmp_path / "imgs", n=30)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    st = embed_images(FakeTeacher(), imgs, tmp_path / "s", workers=0, progress=False)
    assert st.paths and all(owner(p, 2) == 1 for p in st.paths)
    monkeypatch.setenv("RANK", "0")
    st = embed_images(FakeTeacher(), imgs, tmp_path / "s", workers=0, progress=False)
    assert len(st) == 30 and len(set(st.paths)) == 30
