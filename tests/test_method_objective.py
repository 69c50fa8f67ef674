"""forgetting_objective: exact values, gradient signs, normalisation arithmetic, validation."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.method.objective import (
    UNLIKELIHOOD_MIN_ONE_MINUS_P,
    forgetting_objective,
    unlikelihood_term,
)

CE = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
CLS = [1, -1, 1, 0, -1, 1]  # pos: 1, 3, 6 (sum 10); neg: 2, 5 (sum 7); untrained: 4


def _inputs(ce=CE, cls=CLS):
    return (torch.tensor(ce, requires_grad=True), torch.tensor(cls, dtype=torch.int8))


def test_sft_mean_over_all_trained_tokens():
    ce, cls = _inputs()
    out = forgetting_objective(ce, cls, mode="sft")
    assert out.loss.item() == pytest.approx(17.0 / 5)
    assert (out.n_pos, out.n_neg) == (3, 2)
    assert out.pos_loss.item() == pytest.approx(10.0 / 3)
    assert out.neg_loss.item() == pytest.approx(3.5)
    out.loss.backward()
    assert ce.grad.tolist() == pytest.approx([0.2, 0.2, 0.2, 0.0, 0.2, 0.2])


def test_ignore_trains_positives_only():
    ce, cls = _inputs()
    out = forgetting_objective(ce, cls, mode="ignore", lam=0.7)  # lam unused
    assert out.loss.item() == pytest.approx(10.0 / 3)
    out.loss.backward()
    g = ce.grad.tolist()
    assert g == pytest.approx([1 / 3, 0.0, 1 / 3, 0.0, 0.0, 1 / 3])
    assert g[1] == 0.0 and g[4] == 0.0  # negatives: exactly zero gradient


def test_forget_ascent_value_and_gradient_signs():
    ce, cls = _inputs()
    out = forgetting_objective(ce, cls, mode="forget", lam=0.25)
    assert out.loss.item() == pytest.approx(10.0 / 3 - 0.25 * 3.5)
    out.loss.backward()
    g = ce.grad
    assert g[[0, 2, 5]].tolist() == pytest.approx([1 / 3] * 3)  # positives descend
    assert g[[1, 4]].tolist() == pytest.approx([-0.125, -0.125])  # negatives ascend
    assert g[3].item() == 0.0


def test_forget_unlikelihood_value_and_signs():
    ce, cls = _inputs()
    out = forgetting_objective(ce, cls, mode="forget", lam=0.5, negative_term="unlikelihood")
    ul = [-math.log(1 - math.exp(-c)) for c in (2.0, 5.0)]
    assert out.loss.item() == pytest.approx(10.0 / 3 + 0.5 * sum(ul) / 2, rel=1e-6)
    out.loss.backward()
    # d/dc -log(1 - e^-c) = -1 / (e^c - 1): pushes negatives' CE up (p down).
    expected = [0.5 / 2 * (-1 / (math.exp(c) - 1)) for c in (2.0, 5.0)]
    assert ce.grad[[1, 4]].tolist() == pytest.approx(expected, rel=1e-5)
    assert (ce.grad[[1, 4]] < 0).all() and (ce.grad[[0, 2, 5]] > 0).all()


def test_unlikelihood_is_finite_when_p_goes_to_one():
    ce = torch.tensor([0.0, 1e-12, 1e-5, 30.0], requires_grad=True)
    term = unlikelihood_term(ce)
    cap = -math.log(UNLIKELIHOOD_MIN_ONE_MINUS_P)
    assert torch.isfinite(term).all()
    assert term[0].item() == pytest.approx(cap, rel=1e-5)
    assert term[1].item() == pytest.approx(cap, rel=1e-5)
    # Small CE is computed stably (expm1), not 1 - exp(-c) which would round to 0.
    assert term[2].item() == pytest.approx(-math.log(-math.expm1(-1e-5)), rel=1e-5)
    assert term[3].item() == pytest.approx(math.exp(-30.0), rel=1e-3)
    term.sum().backward()
    assert torch.isfinite(ce.grad).all()


def test_empty_classes_contribute_zero_not_nan():
    ce = torch.tensor([1.0, 2.0], requires_grad=True)
    only_pos = torch.tensor([1, 1])
    out = forgetting_objective(ce, only_pos, mode="forget", lam=0.25)
    assert out.loss.item() == pytest.approx(1.5)
    assert out.n_neg == 0 and math.isnan(out.neg_loss.item())
    none = torch.tensor([0, 0])
    out = forgetting_objective(ce, none, mode="forget", lam=0.25)
    assert out.loss.item() == 0.0 and math.isnan(out.pos_loss.item())
    out.loss.backward()
    assert ce.grad.tolist() == [0.0, 0.0]


def test_nan_ce_at_untrained_positions_does_not_leak():
    ce = torch.tensor([1.0, float("nan"), 3.0], requires_grad=True)
    cls = torch.tensor([1, 0, -1])
    for term in ("ascent", "unlikelihood"):
        ce.grad = None
        out = forgetting_objective(ce, cls, mode="forget", lam=0.3, negative_term=term)
        assert math.isfinite(out.loss.item())
        out.loss.backward()
        assert torch.isfinite(ce.grad).all() and ce.grad[1].item() == 0.0


def _split_setup():
    g = torch.Generator().manual_seed(3)
    ce = torch.rand(4, 10, generator=g) * 5
    # Deliberately unequal class counts per micro-batch.
    cls = torch.tensor([
        [1, 1, 1, 1, 1, 1, 1, 1, -1, 0],
        [1, -1, -1, -1, -1, 0, 0, 0, 0, 0],
        [1, 1, -1, 0, 0, 0, 0, 0, 0, 0],
        [-1, -1, -1, -1, -1, -1, 1, 1, 1, 0],
    ])
    return ce, cls


@pytest.mark.parametrize("mode", ["sft", "ignore", "forget"])
@pytest.mark.parametrize("term", ["ascent", "unlikelihood"])
def test_global_normalisation_reproduces_big_batch(mode, term):
    ce, cls = _split_setup()
    world, accum = 2, 2
    big_ce = ce.clone().requires_grad_()
    big = forgetting_objective(big_ce, cls, mode=mode, lam=0.25, negative_term=term)
    big.loss.backward()

    gp, gn = float((cls == 1).sum()), float((cls == -1).sum())
    split_ce = ce.clone().requires_grad_()
    per_rank_grads = []
    total = 0.0
    for rank in range(world):
        rank_grad = torch.zeros_like(ce)
        for micro in range(accum):
            row = rank * accum + micro
            piece = split_ce[row].detach().requires_grad_()
            out = forgetting_objective(
                piece, cls[row], mode=mode, lam=0.25, negative_term=term,
                normalization="global", global_pos_count=gp, global_neg_count=gn,
            )
            scaled = out.loss * (world * accum)  # the caller's scale convention
            scaled.backward()
            # DeepSpeed divides each micro-batch's loss by grad_accum.
            rank_grad[row] = piece.grad / accum
            total += scaled.item() / accum / world
        per_rank_grads.append(rank_grad)
    # DDP averages gradients across ranks.
    averaged = sum(per_rank_grads) / world
    assert total == pytest.approx(big.loss.item(), rel=1e-6)
    torch.testing.assert_close(averaged, big_ce.grad, rtol=1e-6, atol=1e-7)


def test_micro_batch_mode_differs_when_counts_differ():
    ce, cls = _split_setup()
    big = forgetting_objective(ce, cls, mode="forget", lam=0.25).loss.item()
    mean_of_micro = sum(
        forgetting_objective(ce[i], cls[i], mode="forget", lam=0.25).loss.item() for i in range(4)
    ) / 4
    assert abs(mean_of_micro - big) > 1e-3


def test_validation_errors():
    ce, cls = _inputs()
    with pytest.raises(ValueError, match="unknown mode 'dpo'; allowed: sft, ignore, forget"):
        forgetting_objective(ce, cls, mode="dpo")
    with pytest.raises(ValueError, match="allowed: ascent, unlikelihood"):
        forgetting_objective(ce, cls, mode="forget", negative_term="npo")
    with pytest.raises(ValueError, match="allowed: global, micro_batch"):
        forgetting_objective(ce, cls, mode="forget", normalization="batch")
    with pytest.raises(ValueError, match="shape"):
        forgetting_objective(ce, cls[:5], mode="sft")
    with pytest.raises(ValueError, match="global_neg_count must be a finite count >= 0"):
        forgetting_objective(ce, cls, mode="forget", normalization="global",
                             global_pos_count=3, global_neg_count=-1)
    with pytest.raises(ValueError, match="needs global_pos_count"):
        forgetting_objective(ce, cls, mode="ignore", normalization="global")
    with pytest.raises(ValueError, match="smaller than this call's own count 3"):
        forgetting_objective(ce, cls, mode="ignore", normalization="global", global_pos_count=2)
    with pytest.raises(ValueError, match="found 2 at index"):
        forgetting_objective(ce, torch.tensor([1, 2, 0, 0, 0, 0]), mode="sft")
    with pytest.raises(ValueError, match="lam"):
        forgetting_objective(ce, cls, mode="forget", lam=-0.1)


@pytest.mark.parametrize("mode,term,norm", [("sft", "ascent", "micro_batch"),
                                            ("ignore", "ascent", "global"),
                                            ("forget", "ascent", "global"),
                                            ("forget", "unlikelihood", "micro_batch")])
def test_host_class_counts_give_the_same_objective_without_reading_the_device(
        monkeypatch, mode, term, norm):
    """Counts from the caller (counted on the host before the batch moved) give the very same
    loss, gradient and per-class means, and the objective reads nothing back from its tensors
    (on a GPU each read waits for the device)."""
    glob = {"global_pos_count": 5.0, "global_neg_count": 3.0} if norm == "global" else {}
    ce_a, cls = _inputs()
    ref = forgetting_objective(ce_a, cls, mode=mode, lam=0.3, negative_term=term,
                               normalization=norm, **glob)
    ref.loss.backward()

    def no_read(self, *a, **k):
        raise AssertionError("the objective read a tensor back to the host")

    ce_b, _ = _inputs()
    with monkeypatch.context() as m:
        for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
            m.setattr(torch.Tensor, name, no_read)
        out = forgetting_objective(ce_b, cls, mode=mode, lam=0.3, negative_term=term,
                                   normalization=norm, class_counts=(3, 2), **glob)
    out.loss.backward()
    assert torch.equal(out.loss, ref.loss) and torch.equal(ce_b.grad, ce_a.grad)
    assert torch.equal(out.pos_loss, ref.pos_loss) and torch.equal(out.neg_loss, ref.neg_loss)
    assert (out.n_pos, out.n_neg) == (ref.n_pos, ref.n_neg) == (3, 2)
