import hashlib
import json
from dataclasses import replace

import pytest

from clipkd.data.folders import clean_classname, scan_image_folder
from clipkd.data.splits import Split, load_split, write_split
from clipkd.data.synth import WorldConfig, choose_split, synthesize
from clipkd.errors import ClipkdError


def test_default_split_covers_every_attribute():
    split = choose_split(WorldConfig())
    assert len(split.seen) + len(split.unseen) == 64
    assert len(split.unseen) == 16
    for attr in {n.split()[0] for n in split.seen + split.unseen} | {n.split()[1] for n in split.unseen}:
        assert any(attr in n.split() for n in split.seen), attr
    shapes = {n.split()[1] for n in split.unseen}
    assert all(sum(n.endswith(" " + s) for n in split.unseen) == 2 for s in shapes)


def test_split_rejects_leaving_an_attribute_unseen():
    with pytest.raises(ClipkdError):
        choose_split(replace(WorldConfig(), unseen_per_shape=8))


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_world_is_deterministic_and_complete(tmp_path):
    cfg = WorldConfig(n_shapes=3, n_colours=3, unseen_per_shape=1, train_per_class=2, val_per_class=1,
                      test_per_class=1, image_size=16)
    a = synthesize(tmp_path / "a", cfg, workers=1)
    b = synthesize(tmp_path / "b", cfg, workers=2)
    assert _digest(a) == _digest(b)
    data = scan_image_folder(a / "train")
    assert len(data.classnames) == 9 and len(data.paths) == 18
    zh = (a / "train" / "captions_zh.csv").read_text(encoding="utf-8")
    assert "红色" in zh and "圆形" in zh
    en = (a / "train" / "captions_en.csv").read_text().splitlines()
    assert en[0] == "path,caption" and len(en) == 1 + 18 * cfg.captions_per_image
    meta = json.loads((a / "world.json").read_text())
    assert meta["config"]["seed"] == 0 and len(meta["classes"]) == 9


def test_load_split_validates_names(tmp_path):
    write_split(tmp_path / "s.json", Split(seen=["red circle"], unseen=["blue circle"]))
    assert load_split(tmp_path / "s.json", ["red circle", "blue circle"]).unseen == ["blue circle"]
    with pytest.raises(ClipkdError, match="unknown class.*blue circle"):
        load_split(tmp_path / "s.json", ["red circle", "green circle"])
    (tmp_path / "bad.json").write_text('{"seen": ["a"], "unseen": ["a"]}')
    with pytest.raises(ClipkdError, match="both seen and unseen"):
        load_split(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(ClipkdError, match="not valid JSON"):
        load_split(tmp_path / "broken.json")


def test_clean_classname():
    assert clean_classname("red_circle") == "red circle"
    assert clean_classname("great_white__shark ") == "great white shark"
    assert clean_classname("t-shirt") == "t-shirt"  # hyphens are part of real names (T-shirt, yo-yo, go-kart)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipkdError, match="no class sub-folders"):
        scan_image_folder(tmp_path / "empty")
    with pytest.raises(ClipkdError, match="not found"):
        scan_image_folder(tmp_path / "nope")
