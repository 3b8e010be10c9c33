"""The joint loss L = L_action + λ_r · L_rationale, computed from logits and two separate position masks.

Why our own cross-entropy: transformers' `out.loss` is one plain token mean over every unmasked suffix token, so a
batch with a 60-token rationale and 7 action tokens would weight the rationale 9:1 and no λ_r could be applied.
Here each term is the mean over its own positions; prompt (and format-text, padding) positions are in neither mask.
Only the positions that carry a label go through log-softmax, so memory stays small with a 257k vocabulary.

Mask convention: `action_mask[b, t]` / `rationale_mask[b, t]` mark positions t whose *label* `labels[b, t]` is an
action / rationale token, in the same indexing as `input_ids`; the logit that predicts it is `logits[b, t - 1]`.

An optional `format_mask` marks the <eos> that closes an action-only target ("a1 .. a7 <eos>"; refinevla_core.model's
processor supervises every token the policy could generate). Those positions belong to the action target, so they
join the action term's mean (at most 1 token in 8); the token accuracies count action tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional

DEFAULT_LAMBDA_RATIONALE = 0.3


@dataclass
class JointLoss:
    """Both terms and their token counts; `total` is what backpropagates."""

    total: torch.Tensor
    action: torch.Tensor  # mean CE over action (+ format) positions
    rationale: torch.Tensor  # mean CE over rationale positions (0 when there are none); detached when λ_r = 0
    action_tokens: int  # action positions (format positions not included)
    rationale_tokens: int
    action_correct: int  # argmax == label at action positions (teacher forced)
    rationale_correct: int
    format_tokens: int = 0  # format positions inside the action term

    def log_dict(self) -> dict[str, float]:
        out = {"loss": float(self.total.detach()), "loss_action": float(self.action.detach())}
        if self.rationale_tokens:
            out["loss_rationale"] = float(self.rationale.detach())
        return out


def _masked_ce(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
               scored: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
    """Mean CE over positions `mask` (already shifted: logits[i] predicts labels[i]); the correct-argmax count is
    over `scored` (a subset of `mask`; default all of it)."""
    count = int(mask.sum())
    if count == 0:
        return torch.zeros((), dtype=torch.float32, device=logits.device), 0, 0
    picked = logits[mask].float()  # (count, vocab)
    target = labels[mask]
    loss = functional.cross_entropy(picked, target)
    hits = picked.detach().argmax(-1) == target
    if scored is not None:
        hits = hits & scored[mask]
    return loss, count, int(hits.sum())


def joint_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    action_mask: torch.Tensor,
    rationale_mask: torch.Tensor,
    lambda_rationale: float = DEFAULT_LAMBDA_RATIONALE,
    *,
    format_mask: torch.Tensor | None = None,
) -> JointLoss:
    """L = CE(action [+ format] positions) + λ_r · CE(rationale positions). λ_r = 0 is plain action fine-tuning:
    the rationale term is still computed (no gradient) so runs remain comparable in the logs."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    masks = [("action_mask", action_mask), ("rationale_mask", rationale_mask)]
    if format_mask is not None:
        masks.append(("format_mask", format_mask))
    for name, mask in masks:
        if mask.shape != labels.shape:
            raise ValueError(f"{name} must have the labels' shape {tuple(labels.shape)}; got {tuple(mask.shape)}")
    if lambda_rationale < 0:
        raise ValueError(f"lambda_rationale must be >= 0, got {lambda_rationale}")
    action_mask = action_mask.bool()
    rationale_mask = rationale_mask.bool()
    format_mask = format_mask.bool() if format_mask is not None else torch.zeros_like(action_mask)
    if bool((action_mask & rationale_mask).any() | (format_mask & (action_mask | rationale_mask)).any()):
        raise ValueError("a position is marked as more than one of action/rationale/format; the processor's masks "
                         "overlap")
    for name, mask in (("action", action_mask), ("rationale", rationale_mask), ("format", format_mask)):
        if bool((labels[mask] < 0).any()):
            raise ValueError(f"{name} positions carry ignored labels (-100); the masks and labels disagree")
        if bool(mask[:, 0].any()):
            raise ValueError(f"{name} mask marks position 0, which no logit predicts")
    n_act = int(action_mask.sum())
    if n_act == 0:
        raise ValueError("the batch has no action positions: every training sample needs its action tokens")

    shifted_logits = logits[:, :-1]
    shifted_labels = labels[:, 1:]
    action_target = (action_mask | format_mask)[:, 1:]
    action, _, c_act = _masked_ce(shifted_logits, shifted_labels, action_target, scored=action_mask[:, 1:])
    if lambda_rationale > 0:
        rationale, n_rat, c_rat = _masked_ce(shifted_logits, shifted_labels, rationale_mask[:, 1:])
        total = action + lambda_rationale * rationale
    else:
        with torch.no_grad():
            rationale, n_rat, c_rat = _masked_ce(shifted_logits.detach(), shifted_labels, rationale_mask[:, 1:])
        total = action
    return JointLoss(total, action, rationale, n_act, n_rat, c_act, c_rat, format_tokens=int(format_mask.sum()))
