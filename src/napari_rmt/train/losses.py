"""The loss terms of Eqs. 4-6 and the EMA update of Eq. 7."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def sparse_regulariser(class_logits: Tensor, p: float = 0.5) -> Tensor:
    """Eq. 5: ``mean_n ||softmax(c_n)||_p^p`` over the box head's class vectors."""
    if class_logits.numel() == 0:
        return class_logits.sum() * 0.0
    probs = torch.softmax(class_logits, dim=-1)
    # A small floor keeps the gradient of x**p finite where a probability underflows to 0.
    return probs.clamp_min(1e-12).pow(p).sum(dim=-1).mean()


def roi_class_weights(
    labels: Tensor,
    bg_prob: Tensor | None,
    ignored: Tensor | None,
    background: float = 1.0,
    loose: Tensor | None = None,
) -> Tensor:
    """Classification weight of each sampled RoI of an unlabelled image (SPEC §5).

    Foreground RoIs (matched to a pseudo-box) weigh 1. Background RoIs weigh
    ``background`` (``TrainConfig.unsup_background``), times the teacher's background
    probability for the same box when ``bg_prob`` is given (Soft Teacher). Background RoIs
    on a box of the ignore band (``ignored``) weigh 0, and so do foreground RoIs that fit
    their pseudo-box too loosely (``loose``, ``TrainConfig.unsup_min_iou``). The loss divides
    by the sum of the weights (``weighted_focal_loss``).
    """
    weights = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    bg = labels == 0
    if bg_prob is not None:
        weights = torch.where(bg, bg_prob.to(weights.dtype), weights)
    if background != 1.0:
        weights = torch.where(bg, weights * background, weights)
    if ignored is not None:
        weights = torch.where(bg & ignored, torch.zeros_like(weights), weights)
    if loose is not None:
        weights = torch.where(~bg & loose, torch.zeros_like(weights), weights)
    return weights


def unsupervised_loss(losses: dict[str, Tensor], objectness_weight: float = 1.0) -> Tensor:
    """Eq. 4: classification only (RPN objectness + box-head focal) on pseudo-labels.

    ``objectness_weight`` < 1 (``TrainConfig.unsup_objectness``) lets the RPN learn less
    from pseudo-labels: every cell the teacher missed is an RPN negative there."""
    return objectness_weight * losses["loss_objectness"] + losses["loss_classifier"]


def supervised_loss(losses: dict[str, Tensor]) -> Tensor:
    """Eq. 1: every Faster R-CNN term on labelled images."""
    return sum(losses.values())  # type: ignore[return-value]


def total_loss(sup: Tensor, unsup: Tensor, reg: Tensor, lambda_u: float, lambda_r: float) -> Tensor:
    """Eq. 6: ``L = L_sup + lambda_u * L_unsup + lambda_r * L_reg``."""
    return sup + lambda_u * unsup + lambda_r * reg


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """Eq. 7: ``theta' <- sigma * theta' + (1 - sigma) * theta`` for every float tensor.

    Buffers: BatchNorm's running mean and variance are averaged by the same rule as the
    weights (so the teacher normalises with a smoothed history of the student's batch
    statistics, which are noisy at batches of 2-4: one reason GroupNorm, which has no
    buffers, is offered); integer buffers (BatchNorm's step counter) are copied.
    """
    t_state = teacher.state_dict()
    for name, s_value in student.state_dict().items():
        t_value = t_state[name]
        if t_value.dtype.is_floating_point:
            t_value.mul_(decay).add_(s_value.detach(), alpha=1.0 - decay)
        else:
            t_value.copy_(s_value)
