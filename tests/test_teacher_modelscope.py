"""ModelScope teachers: the adapter over ``modelscope.models.Model`` (a stand-in module here, since neither
ModelScope nor its weights can be fetched offline) and the error without ModelScope."""

import sys
import types

import pytest
import torch

from clipkd.errors import ClipkdError
from clipkd.teachers import load_teacher
from clipkd.teachers.modelscope import TEACHERS


class _Tower(torch.nn.Module):
    def __init__(self, dim, tuple_out):
        super().__init__()
        self.proj = torch.nn.Linear(3, dim)
        self.tuple_out = tuple_out

    def features(self, x):
        out = self.proj(x.mean((2, 3)))
        return (out, "extra") if self.tuple_out else out


@pytest.fixture
def fake_modelscope(monkeypatch):
    calls = []

    class Model(torch.nn.Module):
        @classmethod
        def from_pretrained(cls, name):
            calls.append(name)
            if "missing" in name:
                raise FileNotFoundError(f"{name} not in cache")
            m = cls()
            attr, fn = TEACHERS[name if name in TEACHERS else "damo/" + name.rsplit("/", 1)[1]]
            tower = _Tower(24, tuple_out=attr == "model")
            setattr(tower, fn, tower.features)
            setattr(m, attr, tower)
            return m

    models = types.ModuleType("modelscope.models")
    models.Model = Model
    for name, mod in [("modelscope", types.ModuleType("modelscope")), ("modelscope.models", models)]:
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_each_seed_teacher_maps_to_its_image_features(fake_modelscope, name):
    t = load_teacher(f"modelscope:{name}", device="cpu")
    assert t.identity == f"modelscope:{name}" and t.embed_dim == 24 and fake_modelscope == [name]
    emb = t.encode_image(torch.randn(3, 3, 224, 224))
    assert emb.shape == (3, 24) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    with pytest.raises(ClipkdError, match="text tower is not exposed"):
        t.encode_text(["一只猫"])


def test_local_folder_and_errors(fake_modelscope, tmp_path):
    folder = tmp_path / "multi-modal_rleg-vit-large-patch14"
    assert load_teacher(f"modelscope:{folder}", device="cpu").identity == \
        "modelscope:damo/multi-modal_rleg-vit-large-patch14"
    with pytest.raises(ClipkdError, match="is not one of"):
        load_teacher("modelscope:damo/some-other-model", device="cpu")
    with pytest.raises(ClipkdError, match=r"not in the ModelScope cache .* pass modelscope:DIR"):
        load_teacher(f"modelscope:{tmp_path / 'missing' / 'multi-modal_clip-vit-huge-patch14_zh'}", device="cpu")


def test_without_modelscope_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)
    monkeypatch.setitem(sys.modules, "modelscope.models", None)
    with pytest.raises(ClipkdError, match=r"pip install 'clipkd\[modelscope\]'"):
        load_teacher("modelscope:damo/multi-modal_clip-vit-huge-patch14_zh", device="cpu")
