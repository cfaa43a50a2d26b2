"""Scale-out: ranks of one job (torchrun / SLURM), stores shared by ranks, targets read on demand."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clipkd.distributed import my_share, owner, ranks
from clipkd.errors import ClipkdError
from clipkd.store import EmbeddingStore, ShardWriter, TargetRows, embed_images, new_manifest

from .conftest import CLI, FakeTeacher
from .conftest import cli_env as _env
from .conftest import image_folder as _folder


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
    a = ShardWriter(out, new_manifest(info, tmp_path, 2, out), 100)
    b = ShardWriter(out, new_manifest(info, tmp_path, 2, out), 100)
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


_PORTS: dict[int, int] = {}


def _rank_env(rank: int, world: int, job: int = 0) -> dict[str, str]:
    """A rank started by hand: the variables a launcher sets, one meeting address per ``job``."""
    port = _PORTS.setdefault(job, _free_port())
    return {**_env(), "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


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
    imgs = _folder(tmp_path / "imgs", n=300)  # ~100 per rank in shards of 2: time to kill one mid-way
    store = tmp_path / "store"
    cmd = _embed_cmd(micro_spec, imgs, store, "--shard-size", "2", "--batch-size", "2")
    alone = {"CLIPKD_RANK_WAIT": "0"}  # ranks started one after another on purpose: no meeting of the ranks
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_rank_env(1, 3) | alone)
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:
        if (store / "manifest.json").is_file() and EmbeddingStore(store).manifest["count"] >= 4:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert p.wait() == -signal.SIGKILL, "rank 1 finished before it could be killed"
    partial = len(EmbeddingStore(store))
    assert 4 <= partial < 100
    subprocess.run(cmd, check=True, capture_output=True, env=_rank_env(0, 3) | alone)  # rank 0 of 3 did its part
    subprocess.run(cmd, check=True, capture_output=True, env=_env())  # then one process finishes the job
    st = EmbeddingStore(store)
    assert len(st) == 300 and sorted(st.paths) == sorted(set(st.paths)) and st.embeddings().shape == (300, 64)


def test_fake_teacher_store_rows_follow_the_hash_split(tmp_path, monkeypatch):
    imgs = _folder(tmp_path / "imgs", n=30)
    monkeypatch.setenv("CLIPKD_RANK_WAIT", "0")  # the two ranks run one after the other here
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    st = embed_images(FakeTeacher(), imgs, tmp_path / "s", workers=0, progress=False)
    assert st.paths and all(owner(p, 2) == 1 for p in st.paths)
    monkeypatch.setenv("RANK", "0")
    st = embed_images(FakeTeacher(), imgs, tmp_path / "s", workers=0, progress=False)
    assert len(st) == 30 and len(set(st.paths)) == 30


# --- training under DDP: torchrun, 2 CPU processes, gloo ----------------------------------------------------------

def _contrastive_rank(rank: int, img: torch.Tensor, txt: torch.Tensor, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from clipkd.training.modules import contrastive_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    b = len(img) // 2
    mine_i = img[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    mine_t = txt[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    loss_fn = contrastive_loss(rank, 2)
    logits, _ = loss_fn.get_logits(mine_i, mine_t, torch.tensor(10.0))
    loss = loss_fn(mine_i, mine_t, torch.tensor(10.0))
    loss.backward()
    torch.save({"shape": tuple(logits.shape), "loss": loss.item(), "grad": mine_i.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_rank_contrastive_loss_scores_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    from clipkd.training.modules import contrastive_loss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    mp.spawn(_contrastive_rank, args=(img, txt, _free_port(), str(tmp_path)), nprocs=2)
    r = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    assert r[0]["shape"] == r[1]["shape"] == (4, 8)  # each rank's 4 images against all 2 × 4 texts
    whole_i = img.clone().requires_grad_(True)
    whole = contrastive_loss()(whole_i, txt, torch.tensor(10.0))
    whole.backward()
    assert abs((r[0]["loss"] + r[1]["loss"]) / 2 - whole.item()) < 1e-5  # the mean over ranks = the global loss
    # DDP averages gradients over ranks: each rank's share of (its own) image gradients, halved, is the global one
    assert torch.allclose(torch.cat([r[0]["grad"], r[1]["grad"]]) / 2, whole_i.grad, atol=1e-6)


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
            str(_free_port()), "-m", "clipkd.cli", *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _epoch_losses(run) -> list[float]:
    import csv

    rows = csv.DictReader((run / "logs" / "metrics.csv").open())
    return [float(r["loss/total_epoch"]) for r in rows if r.get("loss/total_epoch")]


def _one_and_two_processes(tmp_path, common: list[str]) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """``common`` run as 1 process at batch 16 and as 2 torchrun ranks at batch 8 each (the same global batch)."""
    one = subprocess.run([*CLI, *common, "--out", str(tmp_path / "one"), "--batch-size", "16"], capture_output=True,
                         text=True, env=_env())
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(_torchrun(2, *common, "--out", str(tmp_path / "two"), "--batch-size", "8", "--devices", "2"),
                         capture_output=True, text=True, env=_env())
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp_path / "one", tmp_path / "two", two


@pytest.fixture(scope="module")
def ddp_world(tmp_path_factory, micro_spec):
    from clipkd.data.synth import WorldConfig, synthesize

    root = tmp_path_factory.mktemp("ddp")
    cfg = WorldConfig(n_shapes=4, n_colours=4, unseen_per_shape=1, train_per_class=6, val_per_class=2,
                      test_per_class=3, image_size=24)
    w = synthesize(root / "world", cfg, workers=1)
    subprocess.run(_embed_cmd(micro_spec, w / "train", root / "store"), check=True, capture_output=True,
                   env=_env())
    return w, root / "store"


def test_two_process_distill_reaches_the_one_process_loss(tmp_path, ddp_world):
    w, store = ddp_world
    common = ["distill", "--store", str(store), "--images", str(w / "train"), "--split", str(w / "split.json"),
              "--student", "resnet10t", "--epochs", "3", "--image-size", "32", "--workers", "0", "--device", "cpu",
              "--seed", "0", "--lr", "3e-3"]
    one, two, proc = _one_and_two_processes(tmp_path, common)
    assert proc.stdout.count("student ->") == 1  # rank 0 reports and writes; rank 1 only trains
    run = json.loads((two / "run.json").read_text())
    assert run["train_images"] == json.loads((one / "run.json").read_text())["train_images"]
    first, a, b = _epoch_losses(one)[0], _epoch_losses(one)[-1], _epoch_losses(two)[-1]
    assert b < first / 2 and abs(a - b) < 0.25 * a, (a, b, first)  # same global batch: the same descent


def test_two_process_clip_train_matches_one_process_gathers_validation_and_writes_once(tmp_path, ddp_world,
                                                                                       micro_spec):
    w, store = ddp_world
    common = ["clip-train", "--model", "open_clip:clipkd-micro", "--images", str(w / "train"), "--captions",
              str(w / "train" / "captions_en.csv"), "--val-images", str(w / "val"), "--val-captions",
              str(w / "val" / "captions_en.csv"), "--epochs", "2", "--workers", "0", "--device", "cpu",
              "--teacher", micro_spec, "--seed", "0"]
    one, two, proc = _one_and_two_processes(tmp_path, common)
    assert proc.stdout.count("model:") == 1
    run = json.loads((two / "run.json").read_text())
    assert run["best"]["score"] is not None and run["images"] == 96
    # the contrastive batch is the global one: 16 pairs per step either way, so the losses agree
    a, b = _epoch_losses(one)[-1], _epoch_losses(two)[-1]
    assert abs(a - b) < 0.1 * a, (a, b)


def test_a_job_whose_ranks_do_not_match_its_devices_is_refused_before_work(tmp_path, ddp_world, monkeypatch, capsys):
    from clipkd.cli import main

    w, store = ddp_world
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main(["distill", "--store", str(store), "--images", str(w / "train"), "--out", str(tmp_path / "x"),
               "--student", "resnet10t", "--device", "cpu"])
    assert rc == 2 and "runs 2 ranks but asks for 1 device(s) × 1 node(s)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peers_never_come_is_refused_in_one_line(tmp_path, ddp_world, rank):
    """``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` left over from another job (or ranks that never start): ``distill``
    used to wait in silence for PyTorch's rendezvous timeout; the ranks now meet with a short one, then exit 2."""
    import time

    w, store = ddp_world
    env = {**_env(), "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "CLIPKD_RANK_WAIT": "3"}
    t = time.perf_counter()
    r = subprocess.run([*CLI, "distill", "--store", str(store), "--images", str(w / "train"), "--student",
                        "resnet10t", "--epochs", "1", "--image-size", "32", "--workers", "0", "--device", "cpu",
                        "--devices", "2", "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and f"rank {rank} of 2" in err[0] and "did not meet it at 127.0.0.1" in err[0], err
    assert time.perf_counter() - t < 120
    assert not list((tmp_path / "run").rglob("*.ckpt"))


# --- WebDataset shards -------------------------------------------------------------------------------------------

def _write_shards(folder, out, per_shard: int = 20, captions: dict | None = None) -> dict[str, str]:
    """The ImageFolder ``folder`` as WebDataset shards ``out/shard-N.tar`` (image, .json class, .txt captions), as
    img2dataset or webdataset's TarWriter lay them out; returns sample name → original path."""
    import io
    import tarfile

    from clipkd.data.folders import clean_classname, list_images

    out.mkdir(parents=True, exist_ok=True)
    files, names = list_images(folder), {}
    for s in range(0, len(files), per_shard):
        shard = f"shard-{s // per_shard:03d}.tar"
        with tarfile.open(out / shard, "w") as tar:
            for i, rel in enumerate(files[s:s + per_shard], s):
                key = f"{i:06d}"
                members = {f"{key}{(folder / rel).suffix}": (folder / rel).read_bytes(),
                           f"{key}.json": json.dumps({"class": clean_classname(rel.split("/")[0])}).encode()}
                if captions and rel in captions:
                    members[f"{key}.txt"] = "\n".join(captions[rel]).encode()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                names[f"{shard}/{key}"] = rel
    return names


def test_shards_give_the_store_and_the_eval_numbers_the_folder_gives(tmp_path, tiny_world, micro_spec):
    from clipkd.data.captions import read_captions
    from clipkd.evaluation.zeroshot import evaluate
    from clipkd.prompts import build_prompts, embed_prompts, load_classnames
    from clipkd.teachers import load_teacher

    test = tiny_world / "test"
    names = _write_shards(test, tmp_path / "wds", per_shard=7)
    last = len(list((tmp_path / "wds").iterdir())) - 1
    pattern = str(tmp_path / "wds") + f"/shard-{{000..{last:03d}}}.tar"
    teacher = FakeTeacher()
    a = embed_images(teacher, test, tmp_path / "a", workers=0, progress=False)
    b = embed_images(teacher, pattern, tmp_path / "b", workers=0, progress=False)
    assert sorted(b.paths) == sorted(names) and len(b) == len(a)
    ea, eb = a.embeddings(), b.embeddings()
    for key, row in zip(b.paths, eb, strict=True):
        assert (row == ea[a.rows([names[key]])[0]]).all()
    t = load_teacher(micro_spec, device="cpu")
    text = embed_prompts(t, build_prompts(load_classnames(tiny_world / "train"), ["a photo of a {}."]))
    text.save(tmp_path / "text.npz")
    kw = dict(text=tmp_path / "text.npz", split=tiny_world / "split.json", device="cpu", progress=False, workers=0)
    r_folder, r_shards = evaluate(micro_spec, test, **kw), evaluate(micro_spec, pattern, **kw)
    assert (r_shards.S, r_shards.U, r_shards.H) == (r_folder.S, r_folder.U, r_folder.H)
    # captions ride along as .txt members: a caption source for clip-train / eval-retrieval
    caps, _ = read_captions(tiny_world / "train" / "captions_en.csv", tiny_world / "train")
    names = _write_shards(tiny_world / "train", tmp_path / "wds-train", per_shard=50, captions=caps)
    from clipkd.data.captions import load_caption_source

    src = load_caption_source(str(tmp_path / "wds-train" / "shard-{000..001}.tar"), None)
    assert len(src.pairs) == len(names) and all(src.pairs[k] == caps[names[k]] for k in names)


def test_a_corrupt_sample_is_skipped_and_counted_and_a_cut_shard_keeps_its_whole_samples(tmp_path, tiny_world):
    import io
    import tarfile

    names = _write_shards(tiny_world / "test", tmp_path / "wds", per_shard=100)
    shard = tmp_path / "wds" / "shard-000.tar"
    bad = tmp_path / "wds" / "shard-001.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in (("bad.png", b"not an image at all"), ("bad.json", b'{"class": "x"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    st = embed_images(FakeTeacher(), str(tmp_path / "wds" / "shard-{000..001}.tar"), tmp_path / "s", workers=0,
                      progress=False)
    assert len(st) == len(names) and st.manifest["skipped_count"] == 1
    assert st.manifest["skipped"][0]["path"] == "shard-001.tar/bad"
    cut = tmp_path / "cut" / "cut.tar"
    cut.parent.mkdir()
    data = shard.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # cut mid-member
    from clipkd.data.tars import read_shards

    samples = read_shards(cut)
    assert 0 < len(samples.keys) < len(names) and samples.damaged == [str(cut.resolve())]
    st = embed_images(FakeTeacher(), cut, tmp_path / "s2", workers=0, progress=False)
    assert len(st) + st.manifest["skipped_count"] == len(samples.keys)


def test_distill_clip_train_and_eval_retrieval_read_shards(tmp_path, tiny_world, capsys):
    from clipkd.cli import main
    from clipkd.data.captions import read_captions

    caps, _ = read_captions(tiny_world / "train" / "captions_en.csv", tiny_world / "train")
    _write_shards(tiny_world / "train", tmp_path / "wds", per_shard=40, captions=caps)
    pattern = str(tmp_path / "wds" / "shard-{000..002}.tar")
    store = embed_images(FakeTeacher(), pattern, tmp_path / "store", workers=0, progress=False)
    from clipkd.training.distill import TrainConfig, distill

    cfg = TrainConfig(student="resnet10t", epochs=1, batch_size=8, image_size=32, workers=0)
    r = distill(pattern, tmp_path / "student", cfg, store=store.root, split=tiny_world / "split.json", device="cpu",
                progress=False)
    assert r.train_images > 0 and (tmp_path / "student" / "student.pt").is_file()
    assert main(["eval-retrieval", "--model", str(tmp_path / "student"), "--images", pattern, "--device", "cpu",
                 "--workers", "0", "--out", str(tmp_path / "ret.json")]) == 0
    ret = json.loads((tmp_path / "ret.json").read_text())
    assert ret["n_labels"] == 16 and "i2i_map@10" in ret  # labels from the samples' .json, not shards
    assert main(["clip-train", "--model", "open_clip:clipkd-micro", "--images", pattern, "--out", str(tmp_path / "ct"),
                 "--epochs", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu"]) == 0  # .txt captions
    assert json.loads((tmp_path / "ct" / "run.json").read_text())["images"] == 96


# --- download (img2dataset) -------------------------------------------------------------------------------------

def test_download_saves_shards_counts_failures_and_resumes(tmp_path):
    pytest.importorskip("img2dataset")
    import functools
    import http.server
    import threading

    from PIL import Image

    site = tmp_path / "site"
    site.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(site / f"{i}.jpg")
    (site / "page.jpg").write_text("<html>not an image</html>")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path.startswith("/slow"):
                time.sleep(4)
            return super().do_GET()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    urls = tmp_path / "urls.csv"
    rows = [(f"{base}/{i}.jpg", f"picture {i}") for i in range(3)] + [
        (f"{base}/missing.jpg", "gone"), (f"{base}/page.jpg", "not an image"), (f"{base}/slow/3.jpg", "slow")]
    urls.write_text("url,caption\n" + "".join(f"{u},{c}\n" for u, c in rows))
    cmd = [*CLI, "download", "--urls", str(urls), "--out", str(tmp_path / "out"), "--caption-col", "caption",
           "--image-size", "32", "--per-shard", "3", "--timeout", "1", "--threads", "4"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "downloaded 3 of 6 image(s) into 2 shard(s)" in r.stdout, r.stdout
        report = json.loads((tmp_path / "out" / "_clipkd" / "download.json").read_text())
        assert report["failed_to_download"] == 2 and report["failed_to_resize"] == 1
        assert any("404" in m for m in report["errors"]) and any("timed out" in m for m in report["errors"])
        first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")}
        again = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
        assert again.returncode == 0 and "downloaded 3 of 6" in again.stdout
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.tar")} == first  # kept, not redone
    finally:
        server.shutdown()
    st = embed_images(FakeTeacher(), report["images"], tmp_path / "store", workers=0, progress=False)
    assert len(st) == 3  # the shards feed --images directly
    from clipkd.data.captions import load_caption_source

    assert sorted(c[0] for c in load_caption_source(report["images"], None).pairs.values()) == [
        "picture 0", "picture 1", "picture 2"]


def test_download_input_errors_are_one_line(tmp_path, capsys):
    from clipkd.cli import main

    (tmp_path / "u.csv").write_text("link,caption\nhttp://x/1.jpg,a\n")
    (tmp_path / "local.csv").write_text("url,caption\nhttp://x/1.jpg,a\nfile:///etc/passwd,b\n")
    (tmp_path / "local.txt").write_text("https://x/1.jpg\nFILE:///etc/hostname\n")
    for argv, needle in ((["--urls", str(tmp_path / "none.csv")], "URL list not found"),
                         (["--urls", str(tmp_path / "local.csv")], "1 URL(s) of"),
                         (["--urls", str(tmp_path / "local.txt")], "fetches only http:// and https://"),
                         (["--urls", str(tmp_path / "u.csv")], "has no column 'url'"),
                         (["--urls", str(tmp_path / "u.xlsx")], "URL list not found")):
        assert main(["download", *argv, "--out", str(tmp_path / "o")]) == 2
        assert needle in capsys.readouterr().err
    (tmp_path / "u.xlsx").write_text("x")
    assert main(["download", "--urls", str(tmp_path / "u.xlsx"), "--out", str(tmp_path / "o")]) == 2
    assert "unknown format '.xlsx'" in capsys.readouterr().err


def test_two_rank_index_build_over_shards_holds_every_sample_once(tmp_path, tiny_world, micro_spec):
    pytest.importorskip("faiss")
    from clipkd.search.index import SearchIndex

    names = _write_shards(tiny_world / "test", tmp_path / "wds", per_shard=10)
    last = len(list((tmp_path / "wds").glob("*.tar"))) - 1
    pattern = str(tmp_path / "wds") + f"/shard-{{000..{last:03d}}}.tar"
    r = subprocess.run(_torchrun(2, "index", "build", "--model", micro_spec, "--images", pattern, "--out",
                                 str(tmp_path / "idx"), "--device", "cpu", "--workers", "0"),
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    idx = SearchIndex(tmp_path / "idx")
    assert len(idx) == len(names) and len(set(idx.paths)) == len(names)
    idx.load_encoder(device="cpu")
    first = sorted(idx.paths)[0]  # a sample inside a shard is a query image like any file
    hits = idx.search(image=idx.images_root / first, k=1)
    assert hits[0]["path"] == first and hits[0]["score"] > 0.99
    from clipkd.search.service import create_app

    assert idx.check_images() == 0  # samples inside shards are found (their shard is there), so it serves
    create_app(idx)


def test_missing_shards_are_refused_before_the_teacher_loads(tmp_path, monkeypatch, capsys):
    import clipkd.teachers
    from clipkd.cli import main

    monkeypatch.setattr(clipkd.teachers, "load_teacher", lambda *a, **k: pytest.fail("teacher loaded"))
    pattern = str(tmp_path / "shards") + "/{000..002}.tar"
    assert main(["embed-images", "--teacher", "open_clip:x@random", "--images", pattern, "--out",
                 str(tmp_path / "s")]) == 2
    assert "3 of the 3 tar shard(s)" in capsys.readouterr().err


def test_dataset_paths_are_packed_not_python_strings(tmp_path):
    """A data set's paths live in two numpy arrays (forked loader workers share them instead of copying a page per
    path touched), and still read back as the same strings, by index, slice or iteration, pickled or not."""
    from clipkd.data.loader import ImageDataset, PackedStrings

    paths = [f"class_{i % 7}/img_{i}.jpg" for i in range(5000)] + ["日本/写真.png", ""]
    ds = ImageDataset(tmp_path, paths, transform=lambda im: im, labels=[i % 7 for i in range(len(paths))])
    assert isinstance(ds.paths, PackedStrings) and len(ds) == len(paths)
    assert list(ds.paths) == paths and ds.paths[-2] == "日本/写真.png" and ds.paths[10:13] == paths[10:13]
    assert pickle.loads(pickle.dumps(ds.paths))[4321] == paths[4321]
    assert ds[3]["label"] == 3 and isinstance(ds[3]["label"], int) and ds[3]["error"]  # a missing file: skipped
    assert sum(a.nbytes for a in (ds.paths._bytes, ds.paths._offsets)) < 2 * sum(len(p.encode()) for p in paths)
    with pytest.raises(IndexError):
        ds.paths[len(paths)]


def test_a_lone_rank_says_it_embedded_its_share_only(tmp_path, monkeypatch, caplog):
    """Launcher variables left over in a shell (RANK=0 WORLD_SIZE=2, or SLURM_NTASKS=2 in salloc) made embed-images
    embed half the images with exit code 0 and no word. The ranks sharing a store now meet before any work: a lone
    rank is refused in one line (after CLIPKD_RANK_WAIT seconds), having embedded nothing; ranks started one after
    another on purpose (CLIPKD_RANK_WAIT=0) each say how much of the store is there."""
    imgs = _folder(tmp_path / "imgs", n=20)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # set, then removed: restored after the test, as the meeting sets
        monkeypatch.setenv(k, "0")  # RANK and WORLD_SIZE for PyTorch's rendezvous
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("CLIPKD_RANK_WAIT", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(ClipkdError, match=r"rank 0 of 2 .*did not meet it at 127\.0\.0\.1.*nothing was written to "
                                          r"the embedding store"):
        embed_images(FakeTeacher(), imgs, tmp_path / "s", workers=0, progress=False)
    assert not (tmp_path / "s" / "manifest.json").exists()
    monkeypatch.setenv("CLIPKD_RANK_WAIT", "0")
    with caplog.at_level("WARNING", logger="clipkd"):
        st = embed_images(FakeTeacher(), imgs, tmp_path / "s", workers=0, progress=False)
    assert 0 < len(st) < 20
    assert "rank 0 of 2" in caplog.text and f"holds {len(st)} of 20 images" in caplog.text
    caplog.clear()
    monkeypatch.setenv("SLURM_PROCID", "1")
    with caplog.at_level("WARNING", logger="clipkd"):
        assert len(embed_images(FakeTeacher(), imgs, tmp_path / "s", workers=0, progress=False)) == 20
    assert "embedded its share only" not in caplog.text  # the last rank completes the store


def test_a_store_of_shards_is_refused_for_other_shards_of_the_same_names(tmp_path, tiny_world):
    """Samples record no byte size, so a store of train shards was accepted for test shards named alike (rc 0,
    trained on the wrong embeddings). Each sample's row now records a fingerprint of its bytes in the shard."""
    _write_shards(tiny_world / "train", tmp_path / "train", per_shard=10)
    _write_shards(tiny_world / "test", tmp_path / "test", per_shard=10)
    st = embed_images(FakeTeacher(), str(tmp_path / "train" / "shard-{000..001}.tar"), tmp_path / "store", workers=0,
                      progress=False)
    same = sorted(k for k in st.paths if (tmp_path / "test" / k.split("/")[0]).is_file())
    assert same  # keys the two sets of shards share
    with pytest.raises(ClipkdError, match="differ in content"):
        st.targets(same, root=tmp_path / "test")
    assert len(st.targets(same, root=tmp_path / "train").keep) == len(same)
