"""The joint loss on synthetic logits: separate means per term, the one-position shift, λ_r = 0, bad masks."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from refinevla_core.training.loss import DEFAULT_LAMBDA_RATIONALE, joint_loss

V = 11


def example(batch: int = 2, length: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (batch, length), generator=g)
    labels[:, :3] = -100  # prompt
    rationale = torch.zeros(batch, length, dtype=torch.bool)
    rationale[:, 3:6] = True
    action = torch.zeros(batch, length, dtype=torch.bool)
    action[:, 6:8] = True  # position 8 (eos) is in the suffix but in neither term
    return logits, labels, action, rationale


def manual_ce(logits, labels, mask):
    rows = [(b, t) for b in range(labels.shape[0]) for t in range(1, labels.shape[1]) if mask[b, t]]
    picked = torch.stack([logits[b, t - 1] for b, t in rows])
    target = torch.stack([labels[b, t] for b, t in rows])
    return functional.cross_entropy(picked, target)


def test_each_term_is_the_mean_over_its_own_positions_with_the_shift():
    logits, labels, action, rationale = example()
    out = joint_loss(logits, labels, action, rationale, 0.3)
    torch.testing.assert_close(out.action, manual_ce(logits, labels, action))
    torch.testing.assert_close(out.rationale, manual_ce(logits, labels, rationale))
    torch.testing.assert_close(out.total, out.action + 0.3 * out.rationale)
    assert (out.action_tokens, out.rationale_tokens) == (4, 6)
    assert DEFAULT_LAMBDA_RATIONALE == 0.3


def test_prompt_and_unmarked_positions_do_not_count():
    logits, labels, action, rationale = example()
    base = joint_loss(logits, labels, action, rationale, 0.3).total
    changed = labels.clone()
    changed[:, 8] = (changed[:, 8] + 1) % V  # eos-like position outside both masks
    logits2 = logits.detach().clone()
    logits2[:, :2] += 100.0  # logits predicting prompt positions 1..2
    logits2[:, 7:] -= 50.0  # the last logit predicts nothing; logit 7 predicts the unmarked position 8
    torch.testing.assert_close(joint_loss(logits2, changed, action, rationale, 0.3).total, base.detach())


def test_a_long_rationale_does_not_dilute_the_action_term():
    logits, labels, action, rationale = example(length=9)
    short = joint_loss(logits, labels, action, rationale, 0.3)
    more_rationale = rationale.clone()
    more_rationale[:, 8] = True
    long = joint_loss(logits, labels, action, more_rationale, 0.3)
    torch.testing.assert_close(long.action, short.action)
    assert long.rationale_tokens == short.rationale_tokens + 2


def test_perfect_predictions_give_zero_loss_and_full_accuracy():
    _, labels, action, rationale = example()
    logits = torch.full((2, 9, V), -30.0)
    for b in range(2):
        for t in range(1, 9):
            if labels[b, t] >= 0:
                logits[b, t - 1, labels[b, t]] = 30.0
    out = joint_loss(logits, labels, action, rationale, 0.3)
    assert float(out.total) < 1e-6
    assert (out.action_correct, out.rationale_correct) == (out.action_tokens, out.rationale_tokens)


def test_lambda_zero_is_action_only_and_still_reports_the_rationale_term():
    logits, labels, action, rationale = example()
    out = joint_loss(logits, labels, action, rationale, 0.0)
    torch.testing.assert_close(out.total, out.action)
    assert not out.rationale.requires_grad and float(out.rationale) > 0
    out.total.backward()
    grad_rows = logits.grad.abs().sum(-1)
    # only the logits predicting action positions (5, 6) get a gradient
    assert grad_rows[:, 5:7].gt(0).all() and grad_rows[:, :5].eq(0).all() and grad_rows[:, 7:].eq(0).all()
    assert "loss_rationale" in out.log_dict() and out.log_dict()["loss"] == pytest.approx(float(out.action.detach()))


def test_a_batch_without_rationales_has_a_zero_rationale_term():
    logits, labels, action, rationale = example()
    out = joint_loss(logits, labels, action, torch.zeros_like(rationale), 0.3)
    assert out.rationale_tokens == 0 and float(out.rationale) == 0.0
    torch.testing.assert_close(out.total, out.action)
    assert "loss_rationale" not in out.log_dict()
    out.total.backward()


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda lg, lb, a, r: (lg, lb, a, a), "more than one of action/rationale/format"),
        (lambda lg, lb, a, r: (lg, lb.masked_fill(a, -100), a, r), "ignored labels"),
        (lambda lg, lb, a, r: (lg, lb, a[:, :-1], r), "labels' shape"),
        (lambda lg, lb, a, r: (lg[0], lb, a, r), r"\(B, T, V\)"),
        (lambda lg, lb, a, r: (lg, lb, torch.zeros_like(a), r), "no action positions"),
        (lambda lg, lb, a, r: (lg, lb.clamp(min=0), a.index_fill(1, torch.tensor([0]), True), r), "position 0"),
    ],
)
def test_inconsistent_masks_are_clear_errors(break_it, message):
    logits, labels, action, rationale = example()
    with pytest.raises(ValueError, match=message):
        joint_loss(*break_it(logits, labels, action, rationale), 0.3)


def test_negative_lambda_is_rejected():
    with pytest.raises(ValueError, match="lambda_rationale"):
        joint_loss(*example(), -0.1)


def test_the_eos_closing_an_action_only_target_joins_the_action_term():
    logits, labels, action, rationale = example()
    fmt = torch.zeros_like(action)
    fmt[:, 8] = True  # the <eos> closing the actions
    out = joint_loss(logits, labels, action, rationale, 0.3, format_mask=fmt)
    torch.testing.assert_close(out.action, manual_ce(logits, labels, action | fmt))
    torch.testing.assert_close(out.total, out.action + 0.3 * out.rationale)
    assert (out.action_tokens, out.format_tokens) == (4, 2)
    perfect = torch.full((2, 9, V), -30.0)
    for b in range(2):
        for t in range(1, 9):
            if labels[b, t] >= 0:
                perfect[b, t - 1, labels[b, t]] = 30.0
    assert joint_loss(perfect, labels, action, rationale, 0.3, format_mask=fmt).action_correct == 4
    with pytest.raises(ValueError, match="more than one"):
        joint_loss(logits, labels, action, rationale, 0.3, format_mask=action)
