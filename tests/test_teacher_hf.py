"""Hugging Face transformers teachers (CLIPModel, ChineseCLIPModel): random weights saved with
``save_pretrained`` and loaded through ``hf:DIR`` give the same embeddings as the model built directly."""

import json

import pytest
import torch
from PIL import Image

from clipkd.errors import ClipkdError
from clipkd.teachers import load_teacher

transformers = pytest.importorskip("transformers")


def _clip_tokenizer(folder):
    """CLIP's BPE tokenizer files, written from open_clip's copy of the same vocabulary (no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # OpenAI's spelling
    (folder / "vocab.json").write_text(json.dumps({rename.get(k, k): v for k, v in tok.encoder.items()}))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _small(**extra):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return dict(common, **extra)


@pytest.fixture
def image():
    return Image.new("RGB", (40, 30), (200, 50, 20))


def test_hf_clip_roundtrip(tmp_path, image):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=_small(vocab_size=49408, max_position_embeddings=77),
                                  vision_config=_small(image_size=32, patch_size=8), projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    tok = _clip_tokenizer(tmp_path)
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    out = tmp_path / "model"
    model.save_pretrained(out)
    proc.save_pretrained(out)
    tok.save_pretrained(out)

    teacher = load_teacher(f"hf:{out}", device="cpu")
    assert teacher.embed_dim == 16 and teacher.language == "en" and teacher.identity.startswith(f"hf:{out}#")
    x = teacher.preprocess(image)[None]
    assert torch.allclose(x, proc(images=image, return_tensors="pt")["pixel_values"])
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=x)
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    assert torch.allclose(teacher.encode_image(x), torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)
    texts = ["a photo of a red circle", "a dog"]
    ids = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_t = model.get_text_features(**ids)
        ref_t = ref_t if isinstance(ref_t, torch.Tensor) else ref_t.pooler_output
    assert torch.allclose(teacher.encode_text(texts), torch.nn.functional.normalize(ref_t, dim=-1), atol=1e-5)


def test_hf_chinese_clip_roundtrip(tmp_path, image):
    import cn_clip.clip

    torch.manual_seed(0)
    vocab = cn_clip.clip.__path__[0] + "/vocab.txt"
    cfg = transformers.ChineseCLIPConfig(text_config=_small(vocab_size=21128, max_position_embeddings=64),
                                         vision_config=_small(image_size=32, patch_size=8), projection_dim=16)
    model = transformers.ChineseCLIPModel(cfg).eval()
    tok = transformers.BertTokenizer(vocab)
    proc = transformers.ChineseCLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    out = tmp_path / "model"
    model.save_pretrained(out)
    proc.save_pretrained(out)
    tok.save_pretrained(out)
    teacher = load_teacher(f"hf:{out}", device="cpu")
    assert teacher.language == "multi" and teacher.unk_id == tok.unk_token_id
    texts = ["一只红色的圆形", "蓝色方块在灰色背景上"]
    ids = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_t = model.get_text_features(**ids)
        ref_t = ref_t if isinstance(ref_t, torch.Tensor) else ref_t.pooler_output
    assert torch.allclose(teacher.encode_text(texts), torch.nn.functional.normalize(ref_t, dim=-1), atol=1e-5)
    x = teacher.preprocess(image)[None]
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=x)
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    assert torch.allclose(teacher.encode_image(x), torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)


def test_hf_errors(tmp_path):
    with pytest.raises(ClipkdError, match=r"hf:openai/clip-vit-base-patch32: model files are not in the Hugging "
                                          r"Face cache .* pass hf:DIR"):
        load_teacher("hf:openai/clip-vit-base-patch32", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipkdError, match="not a transformers model folder"):
        load_teacher(f"hf:{tmp_path / 'empty'}", device="cpu")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(ClipkdError, match="is a 'bert' model"):
        load_teacher(f"hf:{tmp_path / 'bert'}", device="cpu")
