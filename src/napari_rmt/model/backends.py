"""How a detector runs inference on the CPU: the backends ``predict --backend`` offers.

- ``torch``: the model as trained (fp32, contiguous tensors).
- ``channels-last``: the same weights in channels-last memory order, which oneDNN's
  convolutions prefer on x86; the boxes are the same to rounding.
- ``onnx``: the backbone and FPN (the convolutions, most of a tile's arithmetic) exported
  once to an ONNX graph and run by ONNX Runtime; the proposals and the box head stay in
  torch, so every detection rule (``DetectOptions``, the local proposal caps) is the same
  code. Needs ``onnxruntime`` and ``onnx`` (the ``onnx`` extra).

Which is fastest, and whether its boxes match the ``torch`` ones, is measured by
``benchmarks/large_image_memory.py backends`` (docs/benchmarks.md); the default is the
fastest that matches (``model.config.DEFAULT_BACKEND``). On 2 cores the three are within
a few per cent of each other: ResNet-18's convolutions at 256 px are already oneDNN's.
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..data.errors import NapariRmtError
from .config import BACKENDS, DEFAULT_BACKEND


class BackendError(NapariRmtError):
    """A backend was asked for that is unknown or cannot run here."""


class _FlatBackbone(nn.Module):
    """The backbone with a tuple out, for export (ONNX outputs are positional)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.backbone(x).values())


class OnnxBackbone(nn.Module):
    """A backbone + FPN run by ONNX Runtime: the same feature maps, by name, as the module
    it was exported from."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendError(
                "backend 'onnx' needs ONNX Runtime: pip install 'napari-rmt[onnx]' (or use --backend torch)"
            ) from exc
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                probe = torch.zeros(1, 3, 64, 64)
                self.names = list(backbone(probe).keys())
                self.out_channels = backbone.out_channels
                outputs = [f"map_{n}" for n in self.names]
                axes = {"images": {0: "batch", 2: "height", 3: "width"}}
                axes.update({o: {0: "batch", 2: f"h_{o}", 3: f"w_{o}"} for o in outputs})
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "backbone.onnx"
                    try:
                        torch.onnx.export(
                            _FlatBackbone(backbone), (torch.zeros(2, 3, 128, 128),), str(path),
                            input_names=["images"], output_names=outputs, dynamic_axes=axes,
                            opset_version=17, dynamo=False,
                        )
                    except ImportError as exc:  # the exporter needs the onnx package
                        raise BackendError(
                            f"backend 'onnx' could not export the backbone ({exc}): pip install 'napari-rmt[onnx]'"
                        ) from exc
                    options = ort.SessionOptions()
                    options.intra_op_num_threads = torch.get_num_threads()  # as torch would use
                    options.inter_op_num_threads = 1
                    self.session = ort.InferenceSession(path.read_bytes(), options, providers=["CPUExecutionProvider"])
        finally:
            backbone.train(was_training)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if x.requires_grad:
            raise BackendError("the onnx backend predicts only; train with the torch model")
        maps = self.session.run(None, {"images": x.detach().contiguous().cpu().numpy()})
        return OrderedDict((n, torch.from_numpy(m)) for n, m in zip(self.names, maps, strict=True))


def for_inference(model: nn.Module, backend: str = DEFAULT_BACKEND) -> nn.Module:
    """``model`` made ready to predict with ``backend``, in place (a model loaded for
    prediction is not trained again). Boxes agree with the ``torch`` backend's to IoU >= 0.9
    for every box measured (docs/benchmarks.md)."""
    if backend not in BACKENDS:
        raise BackendError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    model.eval()
    if backend == "channels-last":
        model.to(memory_format=torch.channels_last)
    elif backend == "onnx":
        model.backbone = OnnxBackbone(model.backbone)
    return model
