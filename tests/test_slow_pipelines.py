"""Full pipelines on real architectures with random weights, loaded from local checkpoint files the way a
user passes them: open_clip ViT-B-32, and Chinese-CLIP ViT-B-16 with Chinese prompts. ``make test-slow``."""

import json

import pytest
import torch

from clipkd.cli import main

pytestmark = pytest.mark.slow


def _pipeline(world, tmp_path, spec, prompts_args):
    store, text, run = tmp_path / "store", tmp_path / "text.npz", tmp_path / "student"
    dev = ["--device", "cpu"]
    assert main(["embed-images", "--teacher", spec, "--images", str(world / "train"), "--out", str(store),
                 "--batch-size", "32", *dev]) == 0
    assert main(["embed-text", "--teacher", spec, *prompts_args, "--out", str(text), *dev]) == 0
    assert main(["distill", "--student", "resnet10t", "--images", str(world / "train"), "--store", str(store),
                 "--text", str(text), "--label-weight", "1", "--split", str(world / "split.json"), "--epochs", "1",
                 "--batch-size", "32", "--image-size", "64", "--out", str(run), *dev]) == 0
    for model in (spec, str(run)):
        out = tmp_path / "eval.json"
        assert main(["eval", "--model", model, "--images", str(world / "test"), "--text", str(text),
                     "--split", str(world / "split.json"), "--val", str(world / "val"), "--out", str(out),
                     "--device", "cpu"]) == 0
        r = json.loads(out.read_text())
        assert all(0.0 <= r[k] <= 1.0 for k in ("S", "U", "H", "top1"))
    return json.loads((store / "manifest.json").read_text())


def test_openclip_vit_b_32_from_local_file(tiny_world, tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    ckpt = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), ckpt)
    manifest = _pipeline(tiny_world, tmp_path, f"open_clip:ViT-B-32@{ckpt}",
                         ["--classes", str(tiny_world / "train"), "--templates", "simple"])
    assert manifest["embed_dim"] == 512 and manifest["teacher"].startswith("open_clip:ViT-B-32@open_clip_pytorch")


def test_cnclip_vit_b_16_from_local_file_with_chinese_prompts(tiny_world, tmp_path):
    from cn_clip.clip.model import CLIP

    from clipkd.teachers.cnclip import model_info

    torch.manual_seed(0)
    info, _ = model_info("ViT-B-16")
    ckpt = tmp_path / "clip_cn_vit-b-16.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in CLIP(**info).state_dict().items()}}, ckpt)
    classes = json.loads((tiny_world / "world.json").read_text())["classes"]
    prompts = {c["name"]: [f"一张{c['zh']}的照片。", f"一个{c['zh']}。"] for c in classes}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False))
    manifest = _pipeline(tiny_world, tmp_path, f"cn_clip:ViT-B-16@{ckpt}",
                         ["--prompts", str(tmp_path / "prompts.json")])
    assert manifest["embed_dim"] == 512 and manifest["teacher"].startswith("cn_clip:ViT-B-16@clip_cn_vit-b-16.pt#")
