"""Freeze a ResNet backbone's first stages for the rest of a run (``TrainConfig.freeze_backbone``).

Why: from the bundled nucleus model the stem and the first stages already respond to what
every H&E tile shares (edges, haematoxylin blobs), and on a CPU their backward pass is a
large share of a step, because they run at the tile's highest resolutions. Frozen, they
need no gradients, and autograd keeps no graph below the first stage that trains, so the
backward pass stops there; the run makes more steps in the same minutes.

A frozen stage keeps its weights *and* its BatchNorm statistics: its BatchNorm layers
normalise with the recorded running statistics in training as in prediction. A frozen
layer that went on normalising with each batch's own statistics would still change what
it outputs from batch to batch, and the unlabelled strong views (colour jitter, erasing)
would reach the stages above it through that. The layers keep BatchNorm's parameters and
buffers under the same names, so checkpoints load into an ordinary detector, and the EMA
teacher (built as an ordinary detector, predicting in eval mode) computes exactly what the
student's frozen stages compute.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..data.errors import NapariRmtError
from .config import FREEZE_STAGES

#: The ResNet body's children in input order, and how many of them each setting freezes.
_BODY = ("conv1", "bn1", "layer1", "layer2", "layer3")
_UPTO = {"none": 0, "stem": 2, "layer1": 3, "layer2": 4, "layer3": 5}


class RecordedStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its running statistics and never updates them."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _fixed(bn: nn.BatchNorm2d) -> RecordedStatsBatchNorm2d:
    out = RecordedStatsBatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
    out.load_state_dict(bn.state_dict())
    return out.to(bn.running_mean.device)


def _fix_statistics(parent: nn.Module) -> None:
    for name, child in parent.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(parent, name, _fixed(child))
        else:
            _fix_statistics(child)


def freeze_backbone(model: nn.Module, upto: str) -> list[str]:
    """Freeze the backbone's body from the input up to stage ``upto``; the frozen parts' names.

    ``model`` is a detector of ``model.detector.build_detector`` with a ResNet backbone;
    the optimizer must be built afterwards, from the parameters that still train.
    """
    if upto not in FREEZE_STAGES:
        raise NapariRmtError(f"freeze_backbone {upto!r} is not one of {FREEZE_STAGES}")
    body = model.backbone.body
    if upto != "none" and not all(hasattr(body, name) for name in _BODY[:2]):
        raise NapariRmtError(f"freeze_backbone {upto!r} needs a ResNet backbone; this one has no conv1 / bn1")
    frozen = [name for name in _BODY[: _UPTO[upto]] if hasattr(body, name)]
    for name in frozen:
        part = getattr(body, name)
        if type(part) is nn.BatchNorm2d:
            setattr(body, name, _fixed(part))
        else:
            _fix_statistics(part)
        getattr(body, name).requires_grad_(False)
    return frozen
