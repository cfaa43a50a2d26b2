"""Weight inheritance (TinyCLIP's manual inheritance): a narrower or shallower CLIP starts from a larger one of its
family, tensor by tensor, by name.

Every student tensor takes the source tensor of the same name, cut to the student's shape:

- **Attention heads stay heads.** Along an axis that holds attention heads (the rows of a fused ``in_proj_weight``
  (Q, K, V blocks), of BERT's separate query / key / value, of an ``AttentionPool2d``'s ``q/k/v_proj``, and the
  columns of the output projection that reads them), Q, K and V are each taken from their own block, and inside a
  block the student gets the source's first *heads* and, of each, its first *dimensions*: whole heads when the
  head size is the same (the student drops heads), the leading dimensions of every head when the head count is the
  same (the student keeps every head, narrower). A plain leading slice would hand the student's K rows the
  teacher's Q rows and cut heads in two.
- **Positions are resampled, not cut.** Positional embeddings of another length (text context) or grid (a ViT at
  another image size) are interpolated as open_clip's ``resize_pos_embed`` / ``resize_text_pos_embed`` do
  (bicubic over the 2-D grid with the class token kept; linear along a text context).
- **Everything else** takes its leading slice (first channels, first rows) — the first layers stand for the
  source's first layers.

Same architecture in, same network out: every tensor is copied whole.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ClipkdError

# a tensor axis made of attention heads: (axis, Q/K/V blocks along it, heads, head size)
HeadAxis = tuple[int, int, int, int]


def head_axes(model: nn.Module) -> dict[str, HeadAxis]:
    """For each parameter of ``model`` with an axis made of attention heads, that axis and its layout. Knows
    ``nn.MultiheadAttention`` (open_clip's text and ViT towers), timm's ``Attention`` (``qkv`` / ``proj``), BERT's
    self-attention (Chinese-CLIP's text tower) and the ``AttentionPool2d`` of CLIP's ModifiedResNet."""
    out: dict[str, HeadAxis] = {}
    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        if isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim:
            h, d = m.num_heads, m.head_dim
            out[f"{p}in_proj_weight"] = (0, 3, h, d)
            out[f"{p}in_proj_bias"] = (0, 3, h, d)
            out[f"{p}out_proj.weight"] = (1, 1, h, d)
        elif isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "num_heads"):  # timm
            h = m.num_heads
            d = m.qkv.out_features // (3 * h)
            out[f"{p}qkv.weight"] = (0, 3, h, d)
            out[f"{p}qkv.bias"] = (0, 3, h, d)
            out[f"{p}proj.weight"] = (1, 1, h, d)
        elif hasattr(m, "num_attention_heads") and hasattr(m, "attention_head_size"):  # BERT self-attention
            h, d = m.num_attention_heads, m.attention_head_size
            for q in ("query", "key", "value"):
                out[f"{p}{q}.weight"] = (0, 1, h, d)
                out[f"{p}{q}.bias"] = (0, 1, h, d)
            parent = name.rpartition(".")[0]  # BertAttention: .self (heads) and .output.dense (reads them)
            out[f"{parent}.output.dense.weight" if parent else "output.dense.weight"] = (1, 1, h, d)
        elif all(isinstance(getattr(m, f"{q}_proj", None), nn.Linear) for q in "qkv") and hasattr(m, "num_heads"):
            h = m.num_heads  # CLIP's AttentionPool2d
            d = m.q_proj.out_features // h
            for q in "qkv":
                out[f"{p}{q}_proj.weight"] = (0, 1, h, d)
                out[f"{p}{q}_proj.bias"] = (0, 1, h, d)
            if isinstance(getattr(m, "c_proj", None), nn.Linear):
                out[f"{p}c_proj.weight"] = (1, 1, h, d)
    return out


def _is_position(name: str) -> bool:
    return name.endswith("positional_embedding") or name.endswith("position_embeddings.weight")


def resize_positions(t: torch.Tensor, n: int, grid: bool) -> torch.Tensor:
    """Positional embeddings ``t`` (N × W) resampled to ``n`` positions: over a square grid with one class token
    first (``grid``: bicubic, antialiased, as open_clip's ``resize_pos_embed``), else along the sequence (linear, as
    ``resize_text_pos_embed``)."""
    import torch.nn.functional as F

    if t.shape[0] == n:
        return t
    if grid:
        g0, g1 = math.isqrt(t.shape[0] - 1), math.isqrt(n - 1)
        tok, img = t[:1], t[1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        img = F.interpolate(img, size=(g1, g1), mode="bicubic", antialias=True, align_corners=False)
        return torch.cat([tok, img.permute(0, 2, 3, 1).reshape(g1 * g1, -1)], dim=0)
    seq = F.interpolate(t.T[None], size=n, mode="linear", antialias=False, align_corners=False)
    return seq[0].T


def _grid(n: int) -> bool:
    return n > 1 and math.isqrt(n - 1) ** 2 == n - 1


def _cut(s: torch.Tensor, shape: torch.Size, src: HeadAxis | None, dst: HeadAxis | None) -> torch.Tensor | None:
    """``s`` cut to ``shape``: heads head-wise along a head axis, a leading slice along every other; None when the
    student asks for more than the source has."""
    if src is not None and dst is not None:
        axis, blocks, h, d = src
        if dst[0] != axis or dst[1] != blocks or dst[2] > h or dst[3] > d or s.shape[axis] != blocks * h * d:
            return None
        lead = [slice(0, n) for n in shape]
        lead[axis] = slice(None)
        s = s[tuple(lead)]
        parts = s.shape[:axis] + (blocks, h, d) + s.shape[axis + 1:]
        idx = [slice(None)] * len(parts)
        idx[axis + 1], idx[axis + 2] = slice(0, dst[2]), slice(0, dst[3])
        s = s.reshape(parts)[tuple(idx)].reshape(shape)
        return s
    if any(a < b for a, b in zip(s.shape, shape, strict=True)):
        return None
    return s[tuple(slice(0, n) for n in shape)]


def inherit_weights(student: nn.Module, source: nn.Module) -> dict[str, int]:
    """Start ``student`` from ``source`` (a larger CLIP of the same family; see the module's text for how each
    tensor is cut). Returns the counts of tensors copied whole, cut (sliced, head-wise or resampled) and kept at
    their initialisation; refused when fewer than half the student's weight matrices have a source."""
    theirs, mine = source.state_dict(), student.state_dict()
    src_heads, dst_heads = head_axes(source), head_axes(student)
    counts = {"whole": 0, "sliced": 0, "kept": 0}
    new = {}
    for name, t in mine.items():
        s = theirs.get(name)
        if s is None or s.dim() != t.dim() or s.dtype != t.dtype:
            counts["kept"] += 1
            continue
        if s.shape == t.shape and src_heads.get(name) == dst_heads.get(name):
            new[name] = s.clone()
            counts["whole"] += 1
            continue
        if _is_position(name) and s.dim() == 2 and s.shape[1] >= t.shape[1] and s.shape[0] != t.shape[0]:
            grid = _grid(s.shape[0]) and _grid(t.shape[0]) and "visual" in name
            cut = resize_positions(s[:, : t.shape[1]], t.shape[0], grid)
        else:
            cut = _cut(s, t.shape, src_heads.get(name), dst_heads.get(name))
        if cut is None:
            counts["kept"] += 1
            continue
        new[name] = cut.contiguous().clone()
        counts["sliced"] += 1
    matrices = [n for n, t in mine.items() if t.dim() >= 2]
    if 2 * sum(n in new for n in matrices) < len(matrices):  # a shared projection's name alone is not a family
        raise ClipkdError(f"`inherit`: the model has {sum(n in new for n in matrices)} of the student's "
                          f"{len(matrices)} weight matrices (by name and shape): not the same family "
                          "(inheritance needs one, e.g. open_clip ViT-B-16 from ViT-L-14)")
    student.load_state_dict(new, strict=False)
    return counts
