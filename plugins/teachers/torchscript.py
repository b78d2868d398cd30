"""A teacher given as a TorchScript file holding a denoiser ``D(x, t[, class_labels])``."""


import hashlib
from pathlib import Path

import torch
from torch import Tensor
from typing import Optional

from core.api import Teacher
from core.base.errors import UserError, first_line
from core.base.io import jit_load  # noqa: F401  (re-exported)


class TorchScriptTeacher(Teacher):
    name = "torchscript"

    def __init__(self, path: Path, shape, num_classes: int = 0, device: str = "cpu"):
        self.path, self.shape, self.num_classes = Path(path), tuple(shape), num_classes
        self.module = jit_load(self.path, "teacher", device).eval()
        self._check(device)

    @classmethod
    def from_options(cls, options, ctx) -> "TorchScriptTeacher":
        return cls(options.path("path"), options.shape("shape"),
                   options.int("num_classes", 0, min=0, max=100_000), ctx.device)

    def _check(self, device):
        x = torch.zeros((2, *self.shape), device=device)
        t = torch.ones(2, device=device)
        labels = torch.zeros(2, dtype=torch.long, device=device) if self.num_classes else None
        try:
            with torch.no_grad():
                out = self.module(x, t, labels) if labels is not None else self.module(x, t)
        except Exception as e:
            raise UserError(f"{self.path}: teacher does not accept (x{list(x.shape)}, t[2]"
                            f"{', class_labels' if labels is not None else ''}): "
                            f"{first_line(e, 160)}"
                            ) from None
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            raise UserError(f"{self.path}: teacher returned "
                            f"{getattr(out, 'shape', type(out).__name__)}, expected {list(x.shape)}")

    def denoiser(self, dtype=torch.float64, device="cpu"):
        wrap = _Conditional if self.num_classes else _Unconditional
        return wrap(self.module).to(device=device, dtype=dtype)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.path.read_bytes()).hexdigest()[:32]
        return f"torchscript:{h}:{list(self.shape)}:{self.num_classes}"


class _Unconditional(torch.nn.Module):
    """Gives an unconditional teacher the (x, t, class_labels=None) signature."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        return self.module(x, t)


class _Conditional(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        return self.module(x, t, class_labels)
