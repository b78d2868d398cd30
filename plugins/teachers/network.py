"""A teacher network trained by the `teacher` stage (EDM preconditioning, DSM loss), loaded from
its file: ``{"format": "ctmkit.teacher", "network": name, "options": {...}, "shape": [...],
"num_classes": k, "sigma_data": s, "state_dict": EMA weights}``."""

import copy
from pathlib import Path

import torch

from core.api import Teacher
from core.diffusion.edm import EDMDenoiser
from core.base.bounds import check_state_dict
from core.base.errors import UserError, first_line
from core.host.plugins import create_network
from core.train.teacher import FORMAT


def read_teacher_file(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"{path}: teacher network file not found (run the 'teacher' stage)")
    from core.base.io import load_torch

    return load_torch(path, "teacher network file", FORMAT,
                      keys={"network": str, "options": dict, "shape": list, "num_classes": int,
                            "sigma_data": (int, float), "state_dict": dict})


class NetworkTeacher(Teacher):
    name = "network"

    def __init__(self, path: Path, ctx):
        self.path = Path(path)
        st = read_teacher_file(self.path)
        if abs(float(st["sigma_data"]) - ctx.diffusion.sigma_data) > 1e-12:
            raise UserError(f"{path}: trained with sigma_data = {st['sigma_data']}, but "
                            f"[diffusion] sigma_data = {ctx.diffusion.sigma_data}")
        self.file = st
        self.shape, self.num_classes = tuple(st["shape"]), int(st["num_classes"])
        self.net = create_network(st["network"], st["options"], ctx, self.shape, self.num_classes,
                                 False, str(path))
        check_state_dict(st["state_dict"], str(path), self.net.state_dict())
        try:
            self.net.load_state_dict(st["state_dict"])
        except RuntimeError as e:
            raise UserError(f"{path}: weights do not fit the network "
                            f"({first_line(e)})") from None
        self.net.eval().requires_grad_(False)
        self.ctx = ctx

    @classmethod
    def from_options(cls, options, ctx) -> "NetworkTeacher":
        return cls(options.path("path", "teacher.pt", base=ctx.out_dir), ctx)

    def denoiser(self, dtype=torch.float64, device="cpu"):
        return EDMDenoiser(copy.deepcopy(self.net), self.ctx.diffusion.sigma_data).to(
            device=device, dtype=dtype).eval()

    def student_network(self):
        """The student: same architecture plus the zero-initialised s pathway, teacher weights
        (wrapped as core.train.students.StudentNetwork, F_theta(x, t, s, class_labels))."""
        from core.train.students import StudentNetwork
        net = create_network(self.file["network"], self.file["options"], self.ctx, self.shape,
                            self.num_classes, True, str(self.path))
        missing, unexpected = net.load_state_dict(self.file["state_dict"], strict=False)
        if unexpected or any(not k.startswith("s_") for k in missing):
            raise UserError(f"{self.path}: network {self.file['network']!r} has no student form "
                            f"whose extra weights are only the s pathway")
        return StudentNetwork(net)

    def fingerprint(self) -> str:
        return "network:" + self.file["sha256"][:32]      # the content digest, checked on load
