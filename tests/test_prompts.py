import numpy as np
import pytest

from clipkd.errors import ClipkdError
from clipkd.prompts import (
    TextEmbeddings,
    build_prompts,
    embed_prompts,
    load_classnames,
    load_templates,
    read_prompts,
    write_prompts,
)


def test_builtin_templates_are_open_clips():
    assert len(load_templates("openai")) == 80
    assert len(load_templates("simple")) == 7
    assert all("{}" in t for t in load_templates("openai"))
    assert load_templates("none") == ["{}"]


def test_build_prompts_fills_every_template():
    p = build_prompts(["red circle", "blue star"], ["a photo of a {}.", "a {}"])
    assert p == {"red circle": ["a photo of a red circle.", "a red circle"],
                 "blue star": ["a photo of a blue star.", "a blue star"]}
    with pytest.raises(ClipkdError, match="duplicate"):
        build_prompts(["a", "a"], ["{}"])


def test_template_file_validation(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a photo of a {}.\nart of the {c}\n")
    assert load_templates(str(f)) == ["a photo of a {}.", "art of the {}"]
    f.write_text("no placeholder here\n")
    with pytest.raises(ClipkdError, match="placeholder"):
        load_templates(str(f))
    with pytest.raises(ClipkdError, match="not found"):
        load_templates(str(tmp_path / "missing.txt"))


def test_seed_style_text_prompts_roundtrip(tmp_path):
    prompts = build_prompts(["goldfish", "great white shark"], ["a photo of a {}."])
    write_prompts(tmp_path / "text_prompts.txt", prompts)
    assert (tmp_path / "text_prompts.txt").read_text() == "a photo of a goldfish.\na photo of a great white shark.\n"
    assert read_prompts(tmp_path / "text_prompts.txt") == prompts
    write_prompts(tmp_path / "p.json", prompts)
    assert read_prompts(tmp_path / "p.json") == prompts


def test_classnames_from_folder_and_file(tiny_world, tmp_path):
    names = load_classnames(tiny_world / "train")
    assert len(names) == 16 and "red circle" in names
    f = tmp_path / "c.txt"
    f.write_text("cat\n\ndog\n")
    assert load_classnames(f) == ["cat", "dog"]


def test_embed_prompts_averages_and_normalises(fake_teacher, tmp_path):
    prompts = {"a": ["x one", "x two"], "b": ["y"]}
    emb = embed_prompts(fake_teacher, prompts)
    raw = fake_teacher.encode_text(["x one", "x two"]).numpy()
    mean = raw.mean(0) / np.linalg.norm(raw.mean(0))
    assert np.allclose(emb.embeddings[0], mean, atol=1e-6)
    assert np.allclose(np.linalg.norm(emb.embeddings, axis=1), 1, atol=1e-6)
    emb.save(tmp_path / "t.npz")
    back = TextEmbeddings.load(tmp_path / "t.npz")
    assert back.classnames == ["a", "b"] and back.teacher == fake_teacher.identity
    assert back.logit_scale == pytest.approx(10.0)
    assert np.array_equal(back.select(["b"]).embeddings, emb.embeddings[[1]])
    with pytest.raises(ClipkdError, match="no class"):
        back.select(["zebra"])
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ClipkdError, match="not a clipkd text-embedding file"):
        TextEmbeddings.load(tmp_path / "other.npz")
