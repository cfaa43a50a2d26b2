import math

import pytest
import torch
import torch.nn.functional as F

from clipkd.errors import ClipkdError
from clipkd.students.losses import EMBEDDING_LOSSES, embedding_loss, label_loss


def test_losses_by_hand():
    s = torch.tensor([[3.0, 4.0]])  # normalised: (0.6, 0.8)
    t = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([0.6 - 1.0, 0.8 - 0.0])
    assert embedding_loss("mse", s, t).item() == pytest.approx((d**2).sum().item())
    assert embedding_loss("l1", s, t).item() == pytest.approx(d.abs().sum().item())
    assert embedding_loss("cosine", s, t).item() == pytest.approx(1 - 0.6)
    # smooth L1 with beta 0.1: both |d| > beta -> |d| - beta/2
    assert embedding_loss("huber", s, t).item() == pytest.approx((0.4 - 0.05) + (0.8 - 0.05))


def test_losses_zero_at_target_and_scale_free():
    t = F.normalize(torch.randn(5, 16), dim=-1)
    for name in EMBEDDING_LOSSES:
        assert embedding_loss(name, 7 * t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_student_only():
    s = torch.randn(4, 8, requires_grad=True)
    t = torch.randn(4, 8, requires_grad=True)
    for name in EMBEDDING_LOSSES:
        s.grad = t.grad = None
        embedding_loss(name, s, t.detach()).backward()
        assert s.grad is not None and s.grad.abs().sum() > 0


def test_label_loss_matches_cross_entropy():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    y = torch.tensor([0, 2])
    logits = 10 * torch.tensor([[1.0, 0.0, math.sqrt(0.5)], [0.0, 1.0, math.sqrt(0.5)]])
    assert label_loss(s, text, y, 10.0).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_size_mismatch_and_unknown_loss_are_clear():
    with pytest.raises(ClipkdError, match="sizes differ"):
        embedding_loss("mse", torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ClipkdError, match="unknown embedding loss"):
        embedding_loss("kl", torch.randn(2, 4), torch.randn(2, 4))


def test_relational_kd_for_clip_train_is_blind_to_rotation_and_needs_no_projection():
    """clip-train's ``relation`` KD compares the batch's image–image similarities: a student that is a rotation of
    its teacher (another space, the same relations) scores 0; a shuffled one does not; no projection is needed."""
    from clipkd.students.losses import kd_loss, kd_needs_projection, kd_needs_text

    torch.manual_seed(0)
    t = torch.randn(16, 32)
    q, _ = torch.linalg.qr(torch.randn(32, 32))
    assert kd_loss("relation", t @ q, t).item() < 1e-10
    assert kd_loss("relation", t[torch.randperm(16)], t).item() > 1e-3
    assert not kd_needs_projection("relation") and not kd_needs_text("relation")
