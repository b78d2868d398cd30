"""The student network F_theta(x, t, s) and its initialisation from the teacher.

* network teachers (and every teacher with a ``student_network()``, e.g. ``edm``, ``openai``):
  the teacher's architecture with the extra, zero-initialised s pathway and the teacher's
  weights (as CTM does), so D_theta(x, t, s) = D_phi(x, t) for every s at step 0;
* analytic / TorchScript teachers: F_theta = F_phi + R_theta(x, t, s), with R a network from
  [network] whose output layer is zero-initialised.

``student.pt`` (written by `distill`): ``{"format": "ctmkit.student", "version": 1,
"teacher_fingerprint": ..., "state_dict": EMA weights}``; the architecture is rebuilt from the
teacher and the config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from core.diffusion.edm import TeacherAsNetwork
from core.base.bounds import check_state_dict
from core.base.errors import UserError, first_line

FORMAT, VERSION = "ctmkit.student", 1


class StudentNetwork(nn.Module):
    """F_theta(x, t, s) for the jumper: a student network plugin called with its s input."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, s: Tensor,
                class_labels: Optional[Tensor] = None) -> Tensor:
        return self.net(x, t, s, class_labels)


class TeacherResidual(nn.Module):
    """F_theta(x, t, s) = F_phi(x, t) + R_theta(x, t, s), R zero at initialisation."""

    def __init__(self, teacher: TeacherAsNetwork, residual: nn.Module):
        super().__init__()
        self.teacher = teacher.requires_grad_(False)
        self.residual = residual

    def forward(self, x: Tensor, t: Tensor, s: Tensor,
                class_labels: Optional[Tensor] = None) -> Tensor:
        return self.teacher(x, t, s, class_labels) + self.residual(x, t, s, class_labels)


def _zero_last_linear(net: nn.Module) -> None:
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def build_student(run) -> nn.Module:
    """A fresh student at its teacher-initialised point (float32)."""
    teacher, cfg = run.teacher, run.cfg
    # fresh layers (the s pathway, the residual) draw their initial weights from a seeded RNG,
    # so that two runs of one config, or a resumed one, start from the same student
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.distill.seed)
        return _build(run, teacher, cfg)


def _build(run, teacher, cfg) -> nn.Module:
    from core.host.plugins import create_network

    if hasattr(teacher, "student_network"):   # F_theta(x, t, s, labels), teacher-initialised
        return teacher.student_network().float()
    opts = {k: v for k, v in cfg.network.data.items() if k != "name"}
    residual = create_network(cfg.network.data.get("name", "mlp"), opts, run.ctx, teacher.shape,
                             teacher.num_classes, True, str(cfg.path))
    _zero_last_linear(residual)
    base = TeacherAsNetwork(teacher.denoiser(torch.float32), cfg.diffusion.sigma_data)
    return TeacherResidual(base, StudentNetwork(residual)).float()


def trainable(net: nn.Module) -> list:
    return [p for p in net.parameters() if p.requires_grad]


def save_student(path: Path, net: nn.Module, teacher_fingerprint: str,
                 origin: dict | None = None) -> None:
    """`origin`: who made it ({"iteration", "precond": {name, variant, jumps_denoiser}}),
    which a warm start from this file checks."""
    from core.base.io import save_torch

    save_torch(path, {"format": FORMAT, "version": VERSION,
                      "teacher_fingerprint": teacher_fingerprint, **(origin or {}),
                      "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}})


def load_student(run, path: Path) -> nn.Module:
    from core.base.io import load_torch

    st = load_torch(path, "student file", FORMAT,
                    keys={"teacher_fingerprint": str, "state_dict": dict})
    if st.get("teacher_fingerprint") != run.teacher.fingerprint():
        raise UserError(f"{path}: distilled from another teacher; rerun 'distill'")
    net = build_student(run)
    check_state_dict(st["state_dict"], str(path), net.state_dict())
    try:
        net.load_state_dict(st["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: weights do not fit the configured student "
                        f"({first_line(e)})") from None
    return net.eval()
