"""Teachers users already hold, loaded without running anything from their files:

* ``edm``: an NVlabs/edm snapshot pickle (``network-snapshot-*.pkl``, ``edm-cifar10-32x32-*.pkl``,
  ...), read by a restricted unpickler (plugins/edm/unpickle.py) and rebuilt in ctmkit's own
  EDMPrecond / VPPrecond / VEPrecond around SongUNet (DDPM++, NCSN++) or DhariwalUNet (ADM);
* ``openai``: an openai/consistency_models teacher state dict (``edm_imagenet64_ema.pt``),
  loaded with ``weights_only=True`` into ctmkit's UNetModel with EDM's scalings.

Both give the denoiser D_phi(x, t[, class_labels]) in the teacher's own preconditioning, and a
student with the teacher's architecture and weights plus a zero-initialised s pathway (as CTM
initialises its students), so that D_theta(x, t, s) = D_phi(x, t) at step 0.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from core.api import Teacher
from core.base.dtypes import DTYPES
from core.diffusion.edm import output_from_denoiser
from core.base.errors import UserError
from core.base.io import file_digest, regular_file


class _TeacherDenoiser(nn.Module):
    """forward(x, t, class_labels=None) -> D_phi(x, t) of a net taking (x, sigma, labels, s),
    run in `run_dtype` (``[teacher] dtype``; None: the input's) and returned in x's dtype."""

    def __init__(self, net: nn.Module, run_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.net = net
        self.cast = run_dtype is not None
        self.run_dtype = run_dtype if run_dtype is not None else torch.float32

    def forward(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        if self.cast:
            return self.net(x.to(self.run_dtype), t, class_labels, None).to(x.dtype)
        return self.net(x, t, class_labels, None)


class DenoiserStudent(nn.Module):
    """F_theta(x, t, s) := (D_theta(x, t, s) - c_skip(t) x) / c_out(t) (Eqn. 3 inverted with
    ctmkit's sigma_data), where D_theta is the teacher's own preconditioned network with its s
    pathway: the jumper then forms exactly D_theta, whatever the teacher's preconditioning."""

    def __init__(self, net: nn.Module, sigma_data: float):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, t: Tensor, s: Tensor,
                class_labels: Optional[Tensor] = None) -> Tensor:
        D = self.net(x, t, class_labels, s)
        return output_from_denoiser(D, x, t.reshape(-1).expand(x.shape[0]), self.sigma_data)


class PretrainedTeacher(Teacher):
    """Common part: a file, a teacher network (x, sigma, labels, s) -> D, its student form."""

    #: ``[teacher] dtype``: how the teacher runs when float32 is asked for (distillation,
    #: sampling, float32 coefficients); float64 requests (float64 coefficients) are kept
    RUN_DTYPES = {"float32": None, "float16": DTYPES["float16"], "bfloat16": DTYPES["bfloat16"]}

    def __init__(self, path: Path, ctx, dtype: str = "float32"):
        self.path, self.ctx = regular_file(path, f"{self.name} teacher file"), ctx
        self.run_dtype = self.RUN_DTYPES[dtype]
        self._digest = file_digest(self.path)

    def _finish(self, net: nn.Module, shape, num_classes: int, sigma_range) -> None:
        self.net = net.eval().requires_grad_(False)
        self.shape, self.num_classes = tuple(int(n) for n in shape), int(num_classes)
        lo, hi = sigma_range
        d = self.ctx.diffusion
        if d.t_min < lo * (1 - 1e-6) or d.t_max > hi * (1 + 1e-6):
            raise UserError(f"{self.path}: this {type(net).__name__} teacher covers sigma in "
                            f"[{lo:.4g}, {hi:.4g}], but [diffusion] asks for [{d.t_min:g}, "
                            f"{d.t_max:g}]; set [diffusion] t_min / t_max inside its range")

    def denoiser(self, dtype=torch.float64, device="cpu"):
        run = self.run_dtype if dtype == torch.float32 else None
        net = copy.deepcopy(self.net).to(device=device, dtype=run or dtype)
        return _TeacherDenoiser(net, run).eval()

    def student_network(self) -> nn.Module:
        """The teacher's architecture and weights plus the zero-initialised s pathway."""
        return DenoiserStudent(self._student_net().float(), self.ctx.diffusion.sigma_data)

    def fingerprint(self) -> str:
        run = "" if self.run_dtype is None else f":{self.run_dtype}".replace("torch.", "")
        return f"{self.name}:{self._digest[:32]}{run}"


class EDMTeacher(PretrainedTeacher):
    name = "edm"

    def __init__(self, path: Path, ctx, key: str = "ema", dtype: str = "float32"):
        super().__init__(path, ctx, dtype)
        from plugins.edm.precond import build_from_spec
        from plugins.edm.unpickle import edm_network_spec, load_edm_snapshot

        self.spec = edm_network_spec(load_edm_snapshot(self.path), key)
        net = build_from_spec(self.spec, student=False)
        self._finish(net, (net.img_channels, net.img_resolution, net.img_resolution),
                     net.label_dim, (net.sigma_min if net.sigma_min > 0 else 0.0,
                                     net.sigma_max))

    @classmethod
    def from_options(cls, options, ctx) -> "EDMTeacher":
        return cls(options.path("path"), ctx,
                   options.str("network", "ema", choices=("ema", "net")),
                   options.str("dtype", "float32", choices=tuple(cls.RUN_DTYPES)))

    def _student_net(self) -> nn.Module:
        from plugins.edm.precond import build_from_spec
        return build_from_spec(self.spec, student=True)


class OpenAITeacher(PretrainedTeacher):
    name = "openai"

    def __init__(self, path: Path, ctx, settings: dict, dtype: str = "float32"):
        super().__init__(path, ctx, dtype)
        from plugins.openai.unet import load_openai_teacher

        self.settings = dict(settings)
        net = load_openai_teacher(self.path, self.settings)
        self._finish(net, (net.in_channels, net.image_size, net.image_size), net.num_classes,
                     (0.0, float("inf")))

    @classmethod
    def from_options(cls, options, ctx) -> "OpenAITeacher":
        path = options.path("path")
        dtype = options.str("dtype", "float32", choices=tuple(cls.RUN_DTYPES))
        settings = {k: options._get(k, None) for k in list(options.data)
                    if k not in ("kind", "path", "dtype")}   # validated by build_openai_unet
        return cls(path, ctx, settings, dtype)

    def _student_net(self) -> nn.Module:
        from plugins.openai.unet import load_openai_teacher
        return load_openai_teacher(self.path, self.settings, student=True)
