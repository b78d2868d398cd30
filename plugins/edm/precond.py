"""EDM's preconditioned denoisers D(x, sigma[, class_labels][, s]) around ctmkit's own
``SongUNet`` / ``DhariwalUNet``, and the builders that turn an EDM snapshot into them.

D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)), Karras et al.
2022, Table 1:

==========  =================  =====================  ====================  ======================
precond     c_skip             c_out                  c_in                  c_noise
==========  =================  =====================  ====================  ======================
EDMPrecond  sd^2 / (s^2+sd^2)  s sd / sqrt(s^2+sd^2)  1 / sqrt(s^2+sd^2)    log(s) / 4
VPPrecond   1                  -s                     1 / sqrt(s^2+1)       (M-1) sigma_vp^-1(s)
VEPrecond   1                  s                      1                     log(s / 2)
==========  =================  =====================  ====================  ======================

with s = sigma, sd = sigma_data and, for VP,
sigma_vp(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1),
sigma_vp^-1(sigma) = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d.

``forward(x, sigma, class_labels=None, s=None, augment_labels=None)``: ``sigma`` (and ``s``) of
shape [B] or [1]; ``class_labels`` one-hot floats [B, label_dim] or int64 class indices [B]
(converted with ``one_hot``); missing labels of a conditional net are all-zero (as in EDM).
A *student* (``student=True``) embeds ``s`` (the jump target, same units as sigma) through its
c_noise rule into the network's zero-initialised ``s_*`` pathway; ``s=None`` means s = sigma.
Runs in the input's dtype (``use_fp16`` is accepted and ignored). Scriptable with TorchScript.
"""

import inspect
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.base.bounds import check_network_kwargs, check_state_dict
from core.base.errors import UserError
from plugins.edm.dhariwal import DhariwalUNet
from plugins.edm.songunet import SongUNet
from plugins.edm.unpickle import EDMNetworkSpec, edm_network_spec, load_edm_snapshot

MODELS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def labels_to_onehot(class_labels: Optional[Tensor], label_dim: int, batch: int,
                     dtype: torch.dtype) -> Optional[Tensor]:
    """Class labels for a network with ``label_dim`` classes: None when unconditional; int
    indices [B] -> one-hot; float one-hot [B, label_dim] passed through; missing -> zeros."""
    if label_dim == 0:
        return None
    if class_labels is None:
        return torch.zeros([batch, label_dim], dtype=dtype)
    if not class_labels.is_floating_point() and class_labels.dim() <= 1:
        return F.one_hot(class_labels.reshape(-1).long(), label_dim).to(dtype)
    return class_labels.to(dtype).reshape(-1, label_dim)


class _Precond(nn.Module):
    """Shared forward; subclasses define ``scalings`` and ``c_noise``."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool,
                 model_type: str, student: bool, model_kwargs: Dict):
        super().__init__()
        self.img_resolution, self.img_channels = int(img_resolution), int(img_channels)
        self.label_dim, self.use_fp16, self.student = int(label_dim), bool(use_fp16), bool(student)
        self.model_type = model_type
        if model_type not in MODELS:
            raise UserError(f"unsupported EDM model_type {model_type!r} "
                            f"(supported: {', '.join(MODELS)})")
        cls = MODELS[model_type]
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "student"}
        unknown = sorted(set(model_kwargs) - known)
        if unknown:
            raise UserError(f"{model_type}: unsupported setting {unknown[0]!r}")
        self.model = cls(img_resolution=img_resolution, in_channels=img_channels,
                         out_channels=img_channels, label_dim=label_dim, student=student,
                         **model_kwargs)

    def scalings(self, sigma: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def c_noise(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Optional[Tensor] = None,
                s: Optional[Tensor] = None, augment_labels: Optional[Tensor] = None) -> Tensor:
        B = x.shape[0]
        sig = sigma.to(device=x.device, dtype=x.dtype).reshape(-1).expand(B)
        c_skip, c_out, c_in = self.scalings(sig.reshape(-1, 1, 1, 1))
        s_noise: Optional[Tensor] = None
        if s is not None:
            s_noise = self.c_noise(s.to(device=x.device, dtype=x.dtype).reshape(-1).expand(B))
        labels = labels_to_onehot(class_labels, self.label_dim, B, x.dtype)
        if labels is not None:
            labels = labels.to(x.device)
        if augment_labels is not None:
            augment_labels = augment_labels.to(device=x.device, dtype=x.dtype)
        F_x = self.model(c_in * x, self.c_noise(sig), labels, augment_labels, s_noise)
        return c_skip * x + c_out * F_x.to(x.dtype)


class EDMPrecond(_Precond):
    """Karras et al. 2022's own preconditioning (Table 1, "EDM" column)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0,
                 use_fp16: bool = False, sigma_min: float = 0.0, sigma_max: float = float("inf"),
                 sigma_data: float = 0.5, model_type: str = "DhariwalUNet", student: bool = False,
                 **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, student,
                         model_kwargs)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data = float(sigma_data)

    def scalings(self, sigma: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        return c_skip, c_out, c_in

    def c_noise(self, sigma: Tensor) -> Tensor:
        return sigma.log() / 4


class VPPrecond(_Precond):
    """The variance-preserving (DDPM++ "VP") preconditioning (Table 1, "VP" column)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0,
                 use_fp16: bool = False, beta_d: float = 19.9, beta_min: float = 0.1,
                 M: int = 1000, epsilon_t: float = 1e-5, model_type: str = "SongUNet",
                 student: bool = False, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, student,
                         model_kwargs)
        self.beta_d, self.beta_min = float(beta_d), float(beta_min)
        self.M, self.epsilon_t = int(M), float(epsilon_t)
        self.sigma_min = float(self.sigma(torch.tensor(self.epsilon_t)))
        self.sigma_max = float(self.sigma(torch.tensor(1.0)))

    @torch.jit.unused
    def sigma(self, t: Tensor) -> Tensor:
        """sigma_vp(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt()
                - self.beta_min) / self.beta_d

    def scalings(self, sigma: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        return c_skip, c_out, c_in

    def c_noise(self, sigma: Tensor) -> Tensor:
        return (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """The variance-exploding (NCSN++ "VE") preconditioning (Table 1, "VE" column)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0,
                 use_fp16: bool = False, sigma_min: float = 0.02, sigma_max: float = 100.0,
                 model_type: str = "SongUNet", student: bool = False, **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, student,
                         model_kwargs)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def scalings(self, sigma: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma)

    def c_noise(self, sigma: Tensor) -> Tensor:
        return (0.5 * sigma).log()


PRECONDS = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond}


def build_precond(class_name: str, init_kwargs: Dict, student: bool = False) -> _Precond:
    """A fresh (randomly initialised) precond module from an EDM class name and init kwargs."""
    name = class_name.rsplit(".", 1)[-1]
    cls = PRECONDS.get(name)
    if cls is None:
        raise UserError(f"unsupported EDM network class {class_name!r} "
                        f"(supported: {', '.join(PRECONDS)})")
    kwargs = dict(init_kwargs)
    kwargs.pop("student", None)
    for required in ("img_resolution", "img_channels"):
        if required not in kwargs:
            raise UserError(f"{name}: the snapshot's init kwargs lack {required!r}")
    check_network_kwargs(kwargs, f"{name}: the snapshot's init kwargs")
    try:
        return cls(student=student, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{name}: cannot build from the snapshot's settings ({e})") from None


def load_state(net: nn.Module, state_dict: Dict[str, Tensor], label: str = "<snapshot>") -> None:
    """Copy EDM weights into ``net``: strict for a teacher; for a student only ``s_*`` keys of
    the network (``model.s_*``) may be missing."""
    student = bool(getattr(net, "student", False))
    check_state_dict(state_dict, label, net.state_dict())
    try:
        missing, unexpected = net.load_state_dict(state_dict, strict=not student)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{label}: the weights do not fit the rebuilt network "
                        f"({' '.join(s.strip() for s in first[:3])[:300]})") from None
    bad = [k for k in missing if not any(p.startswith("s_") for p in k.split("."))]
    bad += list(unexpected)
    if bad:
        raise UserError(f"{label}: the weights do not fit the rebuilt network ({bad[0]!r})")


def build_from_spec(spec: EDMNetworkSpec, student: bool = False) -> _Precond:
    net = build_precond(spec.class_name, spec.init_kwargs, student=student)
    load_state(net, spec.state_dict, spec.source)
    return net.eval()


def load_edm_network(source: Union[str, Path, dict], student: bool = False,
                     key: str = "ema") -> _Precond:
    """An EDM snapshot (path, or the dict from ``load_edm_snapshot``) -> ctmkit's precond module
    with the snapshot's ``key`` weights, in eval mode, float32 on the CPU."""
    snap = source if isinstance(source, dict) else load_edm_snapshot(source)
    return build_from_spec(edm_network_spec(snap, key), student=student)
