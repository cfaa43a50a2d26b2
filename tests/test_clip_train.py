"""CLIP fine-tuning with distillation, Chinese-CLIP (format, checkpoints, Chinese captions), eval-retrieval."""

import csv
import json

import pytest
import torch

from clipkd.cli import main
from clipkd.data.captions import CaptionDataset, TsvImages, load_caption_source
from clipkd.data.loader import collate_skip
from clipkd.errors import ClipkdError
from clipkd.store import embed_images
from clipkd.teachers import load_clip, load_teacher
from clipkd.training.clip_train import ClipTrainConfig, clip_train

from .conftest import write_cnclip

TEACHER = "open_clip:clipkd-tiny@random"


def _subset(src, dst, n_images, lang="en"):
    rows = list(csv.DictReader(open(src / f"captions_{lang}.csv", encoding="utf-8")))
    keep = sorted({r["path"] for r in rows})[:n_images]
    with open(dst, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        w.writerows([r["path"], r["caption"]] for r in rows if r["path"] in keep)
    return dst


@pytest.fixture(scope="module")
def store(tiny_world, tmp_path_factory):
    torch.manual_seed(0)
    teacher = load_teacher(TEACHER, device="cpu")
    path = tmp_path_factory.mktemp("store") / "store"
    embed_images(teacher, tiny_world / "train", path, progress=False)
    return path


def test_kd_from_store_with_projection_freeze_val_and_resume(tiny_world, store, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = ClipTrainConfig(model="open_clip:clipkd-micro", epochs=2, batch_size=16, kd_loss="cosine",
                          freeze_text=True, workers=0)
    spec = clip_train(tiny_world / "train", tiny_world / "train" / "captions_en.csv", out, cfg, store=store,
                      val_images=tiny_world / "val", val_captions=tiny_world / "val" / "captions_en.csv",
                      device="cpu", progress=False).spec
    run = json.loads((out / "run.json").read_text())
    assert run["distillation"]["projection"] is True  # 64-d student, 128-d teacher
    assert run["distillation"]["source"] == "store" and run["best"]["monitor"] == "val/i2i_map@10"
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "training_curves.png").is_file()
    header = (out / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "val/i2i_map@10" in header and "loss/kd_cosine_epoch" in header
    assert load_teacher(spec, device="cpu").embed_dim == 64
    again = clip_train(tiny_world / "train", tiny_world / "train" / "captions_en.csv", out, cfg, store=store,
                       val_images=tiny_world / "val", val_captions=tiny_world / "val" / "captions_en.csv",
                       device="cpu", progress=False).spec
    assert again == spec  # finished run: resumes at its end and saves the same model
    with pytest.raises(ClipkdError, match="inputs.val_images"):  # validation picks the saved epoch: part of the run
        clip_train(tiny_world / "train", tiny_world / "train" / "captions_en.csv", out, cfg, store=store,
                   device="cpu", progress=False)


def test_freeze_keeps_tower_fixed_and_online_teacher(tiny_world, tmp_path):
    from clipkd.training.modules import ClipModule

    torch.manual_seed(0)
    student = load_clip("open_clip:clipkd-micro")
    teacher = load_teacher(TEACHER, device="cpu")
    module = ClipModule(student, kd_loss="mse", teacher=teacher, teacher_dim=teacher.embed_dim, freeze_text=True)
    frozen = {n: p.clone() for n, p in student.model.named_parameters() if not n.startswith("visual.")}
    ds = CaptionDataset(load_caption_source(tiny_world / "train", tiny_world / "train" / "captions_en.csv"), None,
                        lambda im: (student.train_preprocess(im), teacher.preprocess(im)), student.tokenizer)
    batch = collate_skip([ds[i] for i in range(8)])
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0)
    module.log_dict = module.log = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    loss.backward()
    assert module.proj is not None and module.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())
    opt.step()
    for n, p in student.model.named_parameters():
        if n in frozen and n != "logit_scale":
            assert torch.equal(p, frozen[n]), n


def test_cnclip_tsv_jsonl_reader(tiny_world, tmp_path, caplog):
    tsv, jsonl = write_cnclip(tmp_path, tiny_world)
    source = load_caption_source(tsv, jsonl)
    assert "1 image id(s)" in caplog.text  # 424242 is not in the TSV: left out and reported
    assert source.missing == ["424242"] and len(source.pairs) == 7
    ds = CaptionDataset(source, None, lambda im: torch.zeros(3, 4, 4) + im.size[0], lambda t: torch.ones(len(t), 5))
    items = [ds[i] for i in range(len(ds))]
    batch = collate_skip(items)
    assert len(batch["skipped"]) == 1 and "broken" == ds.paths[batch["skipped"][0][0]]  # bad base64: skipped
    assert batch["image"].shape[0] == 6
    images = TsvImages(tsv)
    assert images.open("1000").size == (24, 24)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ClipkdError, match="line 1: expected JSON with 'text' and 'image_ids'"):
        load_caption_source(tsv, bad)


def test_cnclip_checkpoint_roundtrip_and_wrong_architecture(tmp_path):
    from cn_clip.clip.model import CLIP

    from clipkd.teachers.cnclip import model_info

    torch.manual_seed(0)
    info, _ = model_info("RN50")
    model = CLIP(**info).eval()
    ckpt = tmp_path / "epoch_latest.pt"  # as Chinese-CLIP's training saves it (DDP-wrapped keys)
    torch.save({"epoch": 1, "step": 10, "name": "test",
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    teacher = load_teacher(f"cn_clip:RN50@{ckpt}", device="cpu")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(x), dim=-1)
    assert torch.allclose(teacher.encode_image(x), ref, atol=1e-5)
    texts = ["一只红色的圆形", "蓝色方块"]
    from cn_clip.clip import tokenize

    with torch.no_grad():
        ref_t = torch.nn.functional.normalize(model.encode_text(tokenize(texts, context_length=52)), dim=-1)
    assert torch.allclose(teacher.encode_text(texts), ref_t, atol=1e-5)
    assert teacher.identity.startswith("cn_clip:RN50@epoch_latest.pt#") and teacher.embed_dim == 1024
    with pytest.raises(ClipkdError, match="does not fit Chinese-CLIP ViT-B-16"):
        load_teacher(f"cn_clip:ViT-B-16@{ckpt}", device="cpu")
    with pytest.raises(ClipkdError, match="cannot be downloaded here"):
        load_teacher("cn_clip:RN50", device="cpu")
    with pytest.raises(ClipkdError, match="has no model 'ViT-Q'"):
        load_teacher("cn_clip:ViT-Q@random", device="cpu")


def test_chinese_student_end_to_end(tiny_world, store, tmp_path, capsys):
    """clipkd's own small Chinese-CLIP (Chinese-CLIP's tokenizer and BERT text tower) fine-tunes with KD from an
    English teacher's image store and evaluates on Chinese captions."""
    captions = _subset(tiny_world / "train", tmp_path / "zh.csv", 8, "zh")
    out = tmp_path / "cn"
    with pytest.raises(ClipkdError, match="clipkd's own architecture, with no published weights"):
        load_teacher("cn_clip:clipkd-micro-zh", device="cpu")
    assert main(["clip-train", "--images", str(tiny_world / "train"), "--captions", str(captions),
                 "--out", str(out), "--model", "cn_clip:clipkd-micro-zh@random", "--store", str(store),
                 "--kd-loss", "cosine", "--epochs", "1", "--batch-size", "4", "--workers", "0",
                 "--device", "cpu"]) == 0
    assert (out / "cn_clip_model.pt").is_file()
    test_zh = _subset(tiny_world / "test", tmp_path / "test_zh.csv", 8, "zh")
    capsys.readouterr()
    assert main(["eval-retrieval", "--model", str(out), "--images", str(tiny_world / "test"),
                 "--captions", str(test_zh), "--out", str(tmp_path / "r.json"), "--device", "cpu"]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["model"].startswith("cn_clip:clipkd-micro-zh@") and r["n_texts"] > r["n_images"] == 8
    for k in ("t2i_r@1", "t2i_r@10", "i2t_r@1", "mean_recall", "i2i_map@10", "i2i_p@10"):
        assert 0.0 <= r[k] <= 1.0
    assert (tmp_path / "r.png").is_file()


def test_bad_inputs_are_clear(tiny_world, store, tmp_path, capsys):
    zh = tiny_world / "train" / "captions_zh.csv"
    run = ["clip-train", "--images", str(tiny_world / "train"), "--out", str(tmp_path / "x"), "--epochs", "1",
           "--device", "cpu", "--workers", "0", "--batch-size", "4"]
    # an English-only student cannot read Chinese captions
    assert main(run + ["--captions", str(zh), "--model", "clipkd-micro"]) == 2
    assert "English-only tokenizer" in capsys.readouterr().err
    # nor can an English teacher for the affinity loss
    assert main(run + ["--captions", str(zh), "--model", "cn_clip:RN50@random", "--teacher", TEACHER,
                       "--kd-loss", "affinity"]) == 2
    assert "teacher open_clip:clipkd-tiny" in capsys.readouterr().err
    # affinity from a store alone has no teacher text tower
    assert main(run + ["--captions", str(tiny_world / "train" / "captions_en.csv"), "--store", str(store),
                       "--kd-loss", "affinity"]) == 2
    assert "pass --teacher" in capsys.readouterr().err
    # captions naming missing images: left out and counted; all missing: an error
    bad = tmp_path / "bad.csv"
    bad.write_text("path,caption\nnope/1.png,a thing\nnope/2.png,another\n")
    assert main(run + ["--captions", str(bad)]) == 2
    assert "none of the images named" in capsys.readouterr().err
    with pytest.raises(ClipkdError, match="has no model"):
        load_teacher("open_clip:no-such-net@random", device="cpu")


def test_clip_train_learns_from_stored_views_and_uncaptioned_images(tiny_world, tmp_path, monkeypatch):
    """A store of views over the whole folder: a captioned subset trains the contrastive and distillation terms,
    its other views and the uncaptioned rest (--extra-images) the distillation term alone, one view per image per
    epoch."""
    from clipkd.data.views import ViewPlan
    from clipkd.training import modules

    torch.manual_seed(0)
    teacher = load_teacher(TEACHER, device="cpu")
    views = embed_images(teacher, tiny_world / "train", tmp_path / "views", views=3, progress=False, workers=0)
    plan = ViewPlan.load(views.root / "views.json")
    caps = _subset(tiny_world / "train", tmp_path / "caps.csv", 20)
    seen = []
    real = modules.ClipModule.training_step

    def spy(self, batch, idx):
        seen.append((batch["captioned"].clone(), batch["caption_id"].clone(), len(batch["image"])))
        return real(self, batch, idx)

    monkeypatch.setattr(modules.ClipModule, "training_step", spy)
    cfg = ClipTrainConfig(model="open_clip:clipkd-micro", epochs=1, batch_size=16, kd_loss="mse", workers=0)
    r = clip_train(tiny_world / "train", caps, tmp_path / "run", cfg, store=views.root,
                   extra_images=tiny_world / "train", device="cpu", progress=False)
    captioned = torch.cat([c for c, _, _ in seen])
    ids = torch.cat([i for _, i, _ in seen])
    n_images = len(plan.images)
    # an epoch: each captioned image once, one other view of each, one view of each uncaptioned image (the
    # sampler's groups), cut to whole batches
    assert len(captioned) == (20 + 20 + (n_images - 20)) // 16 * 16
    assert captioned.sum() > 0 and (~captioned).sum() > captioned.sum()
    assert (ids[~captioned] == -1).all() and (ids[captioned] >= 0).all()
    assert r.train_images > 0 and load_teacher(r.spec, device="cpu").embed_dim == 64
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["distillation"]["source"] == "store"
    for kw, match in (({"store": None, "teacher": None}, "give `store`"),
                      ({"extra_images": tiny_world / "val"}, "are composed under `images`"),):
        with pytest.raises(ClipkdError, match=match):
            clip_train(tiny_world / "train", caps, tmp_path / "bad", cfg, **{"store": views.root,
                       "extra_images": tiny_world / "train", **kw}, device="cpu", progress=False)
    bad = ClipTrainConfig(model="open_clip:clipkd-micro", epochs=1, batch_size=16, kd_loss="affinity", workers=0)
    with pytest.raises(ClipkdError, match="images without captions need an image-embedding loss"):
        clip_train(tiny_world / "train", caps, tmp_path / "bad", bad, store=views.root, teacher=TEACHER,
                   extra_images=tiny_world / "train", device="cpu", progress=False)


def test_weight_inheritance_starts_the_student_from_slices_of_a_larger_clip(tiny_world, store, tmp_path):
    """TinyCLIP's manual inheritance: clipkd-micro (64 wide, 2 text layers) takes clipkd-tiny's tensors of the same
    names, cut to its shape; clip-train records it; an unrelated model is refused."""
    from clipkd.training.clip_train import ClipTrainConfig, clip_train
    from clipkd.training.inherit import inherit_weights

    torch.manual_seed(0)
    big = load_clip("open_clip:clipkd-tiny")
    small = load_clip("open_clip:clipkd-micro")
    counts = inherit_weights(small.model, big.model)
    assert counts["whole"] > 0 and counts["sliced"] > 0 and counts["kept"] > 0
    mine, theirs = small.model.state_dict(), big.model.state_dict()
    assert torch.equal(mine["token_embedding.weight"], theirs["token_embedding.weight"][:, :64])
    assert torch.equal(mine["transformer.resblocks.1.mlp.c_fc.weight"],
                       theirs["transformer.resblocks.1.mlp.c_fc.weight"][:256, :64])
    with pytest.raises(ClipkdError, match="not the same family"):
        inherit_weights(small.model, load_clip("cn_clip:clipkd-micro-zh@random").model)
    spec = big.save(tmp_path / "big")
    captions = _subset(tiny_world / "train", tmp_path / "en.csv", 8, "en")
    r = clip_train(tiny_world / "train", captions, tmp_path / "run", ClipTrainConfig(
        model="open_clip:clipkd-micro", inherit=spec, epochs=1, batch_size=4, workers=0), device="cpu")
    assert json.loads((r.out / "run.json").read_text())["inherited"] == {"from": spec, **counts}
    with pytest.raises(ClipkdError, match="no such file or folder"):
        clip_train(tiny_world / "train", captions, tmp_path / "gone", ClipTrainConfig(
            model="open_clip:clipkd-micro", inherit=str(tmp_path / "no-such-run"), epochs=1, batch_size=4,
            workers=0), device="cpu")


def _heads(t: torch.Tensor, blocks: int, heads: int, dim: int, axis: int = 0) -> torch.Tensor:
    """A head axis of ``t`` as (blocks, heads, head size) first."""
    t = t.movedim(axis, 0)
    return t.reshape(blocks, heads, dim, *t.shape[1:])


def test_inheritance_keeps_attention_heads_and_resamples_positions():
    """Into the same architecture the student is the teacher, output for output; into a narrower one every Q, K and
    V row comes from the teacher's own Q, K or V block, head by head (open_clip's fused in_proj, BERT's separate
    projections and an AttentionPool2d); a ViT of another grid inherits the teacher's positions resampled as
    open_clip's resize_pos_embed does, not cut."""
    import open_clip
    from open_clip.model import resize_pos_embed

    from clipkd.training.inherit import inherit_weights

    torch.manual_seed(0)
    big = load_clip("open_clip:clipkd-tiny").model.eval()
    same = load_clip("open_clip:clipkd-tiny").model.eval()
    assert inherit_weights(same, big)["sliced"] == 0
    tokens, x = torch.randint(1, 400, (3, 24)), torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(same.encode_text(tokens), big.encode_text(tokens))
        assert torch.equal(same.encode_image(x), big.encode_image(x))

    small = load_clip("open_clip:clipkd-micro").model  # width 128 → 64, 2 heads each: 64 → 32 dims a head
    inherit_weights(small, big)
    for layer in range(2):
        for kind in ("weight", "bias"):
            name = f"transformer.resblocks.{layer}.attn.in_proj_{kind}"
            t = _heads(big.state_dict()[name], 3, 2, 64)
            s = _heads(small.state_dict()[name], 3, 2, 32)
            want = t[:, :, :32, :64] if kind == "weight" else t[:, :, :32]
            assert torch.equal(s, want), name  # Q from Q, K from K, V from V; each head its own leading dims
        out = f"transformer.resblocks.{layer}.attn.out_proj.weight"
        assert torch.equal(_heads(small.state_dict()[out], 1, 2, 32, axis=1),
                           _heads(big.state_dict()[out], 1, 2, 64, axis=1)[:, :, :32, :64])

    zh_big = load_clip("cn_clip:clipkd-tiny-zh@random").model  # BERT 96 → 64 wide; attnpool 12 → 4 heads of 64
    zh = load_clip("cn_clip:clipkd-micro-zh@random").model
    inherit_weights(zh, zh_big)
    for q in ("query", "key", "value"):
        name = f"bert.encoder.layer.1.attention.self.{q}.weight"
        assert torch.equal(_heads(zh.state_dict()[name], 1, 2, 32), _heads(zh_big.state_dict()[name], 1, 2, 48)
                           [:, :, :32, :64])
    for q in ("q", "k", "v"):
        name = f"visual.attnpool.{q}_proj.weight"
        assert torch.equal(zh.state_dict()[name], zh_big.state_dict()[name][:256, :256])  # the first 4 heads

    vit = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
               text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1))
    teacher = open_clip.CLIP(**vit)
    grid6 = open_clip.CLIP(**{**vit, "vision_cfg": {**vit["vision_cfg"], "image_size": 48}})  # 4×4 → 6×6 patches
    inherit_weights(grid6, teacher)
    want = {"visual.positional_embedding": teacher.state_dict()["visual.positional_embedding"].clone()}
    resize_pos_embed(want, grid6)
    assert want["visual.positional_embedding"].shape == (37, 64)
    assert torch.allclose(grid6.state_dict()["visual.positional_embedding"], want["visual.positional_embedding"])
    for name in ("visual.transformer.resblocks.0.attn.in_proj_weight", "visual.conv1.weight"):
        assert torch.equal(grid6.state_dict()[name], teacher.state_dict()[name])


def test_text_tower_kd_trains_the_captions_onto_the_teachers(tiny_world, store, tmp_path, capsys):
    """--kd-text-weight: the student's caption embeddings (projected, 64-d → 128-d) learn the teacher's, beside image
    KD from the store; without a teacher's text tower it is refused before any work."""
    captions = _subset(tiny_world / "train", tmp_path / "en.csv", 8)
    out = tmp_path / "text-kd"
    run = ["clip-train", "--images", str(tiny_world / "train"), "--captions", str(captions), "--model",
           "clipkd-micro", "--store", str(store), "--kd-loss", "mse", "--epochs", "2", "--batch-size", "4",
           "--workers", "0", "--device", "cpu"]
    assert main(run + ["--out", str(tmp_path / "no"), "--kd-text-weight", "1"]) == 2
    assert "--kd-text-weight distils the text tower: pass --teacher SPEC" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
    assert main(run + ["--out", str(out), "--kd-text-weight", "1", "--teacher", TEACHER]) == 0
    info = json.loads((out / "run.json").read_text())["distillation"]
    assert info["text_weight"] == 1 and info["projection"] and info["source"] == "store"
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    text_kd = [float(r["loss/kd_text_epoch"]) for r in rows if r.get("loss/kd_text_epoch")]
    assert len(text_kd) == 2 and text_kd[1] < text_kd[0]
