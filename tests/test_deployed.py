"""Deployed models without PyTorch (clipkd.deployed): the numpy preprocessing and the embedded tokenizer give what
torchvision and open_clip give, to the last id and bit."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipkd.data.preprocess import PreprocessConfig
from clipkd.deployed import BpeTokenizer, bpe_tokenizer_spec


def test_numpy_preprocessing_equals_the_torchvision_transform():
    import open_clip.constants as c

    assert PreprocessConfig().mean == tuple(c.OPENAI_DATASET_MEAN) and PreprocessConfig().std == tuple(
        c.OPENAI_DATASET_STD)
    rng = np.random.default_rng(0)
    for size in ((32, 32), (224, 224), (24, 40)):
        for mode, crop in (("shortest", True), ("shortest", False), ("squash", True)):
            for interp in ("bicubic", "bilinear", "nearest"):
                cfg = PreprocessConfig(size=size, resize_mode=mode, crop=crop, interpolation=interp)
                for w, h in ((17, 53), (300, 200), (32, 32), (33, 31), (1, 5), (500, 375), (375, 500), (641, 427)):
                    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                    want = cfg.transform()(img).numpy()
                    got = cfg.to_array(img)
                    assert got.dtype == np.float32 and got.shape == want.shape
                    assert np.array_equal(got, want), (size, mode, crop, interp, (w, h))


def test_embedded_tokenizer_gives_open_clips_ids():
    import open_clip

    from clipkd.export.onnx import SAMPLE_TEXTS, TOKENIZER_CHECKS

    ref = open_clip.get_tokenizer("ViT-B-32")
    ours = BpeTokenizer(bpe_tokenizer_spec(ref, 77))
    rng = np.random.default_rng(0)
    pool = [*"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,'!?-_&;#<>/\\\t\n",
            *"éüßñçøå漢字かなカナ한국어Ωπж😀ﬁ①²٣", "'s", "'ll", "&amp;", "&lt;", "<end_of_text>", "<start_of_text>",
            "  "]
    texts = [*SAMPLE_TEXTS, *TOKENIZER_CHECKS, *("".join(rng.choice(pool, rng.integers(0, 60))) for _ in range(800))]
    got, want = ours(texts), ref(texts).numpy()
    assert got.dtype == np.int64 and got.shape == want.shape
    bad = [t for t, a, b in zip(texts, got, want, strict=True) if not np.array_equal(a, b)]
    assert bad == []


def test_a_tokenizer_that_cannot_be_embedded_is_not():
    import open_clip

    canon = open_clip.tokenizer.SimpleTokenizer(clean="canonicalize")
    assert bpe_tokenizer_spec(canon, 77) is None
    assert bpe_tokenizer_spec(object(), 77) is None
    with pytest.raises(Exception, match="clipkd-bpe"):
        BpeTokenizer({"format": "other"})
