"""The jumper: the consistency function f_theta(x, t, s) as one TorchScript-able module, and its
export / load (DESIGN.md, "Exported jumper").

    f_theta(x, t, s) = f(t, s) x + g(t, s) D_theta(x, t, s),  D_theta = c_skip x + c_out F_theta
    (or f x + g F_theta for preconditionings with ``jumps_denoiser = False``; Table 1): `jump`

The file is a TorchScript archive whose extra file ``meta.json`` describes it; the same file is
what the C++ ``ctm_sample`` loads.
"""


import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from core import __version__
from core.edm import TeacherAsNetwork  # noqa: F401  (re-exported)
from core.edm import append_dims, denoiser_from_output
from core.bounds import load_json
from core.errors import UserError
from core.io import jit_load, write_bytes

FORMAT, VERSION = "ctmkit.jumper", 1
DTYPES_BY_NAME = {"float32": torch.float32, "float64": torch.float64}
META_KEYS = ("format", "version", "precond", "variant", "sigma_data", "t_min", "t_max", "rho",
             "shape", "num_classes", "dtype", "ctmkit_version")


def jump(x: Tensor, F: Tensor, t: Tensor, f: Tensor, g: Tensor, sigma_data: float,
         jumps_denoiser: bool) -> Tensor:
    """f_theta(x, t, s) = f x + g D_theta with D_theta = c_skip(t) x + c_out(t) F, or f x + g F
    when the preconditioning does not jump the denoiser (CM / BCM, Table 1); f, g [B] (float64
    from the preconditioning at (t, s)), F the network's output for x."""
    inner = denoiser_from_output(F, x, t, sigma_data) if jumps_denoiser else F
    return append_dims(f, x) * x + append_dims(g, x) * inner                  # Eqn. (8)


class Jumper(nn.Module):
    """forward(x, t, s, class_labels=None) -> f_theta(x, t, s); t, s of shape [B] or scalars."""

    def __init__(self, network: nn.Module, precond: nn.Module, sigma_data: float):
        super().__init__()
        self.network = network
        self.precond = precond
        self.sigma_data = float(sigma_data)
        self.jumps_denoiser = bool(precond.jumps_denoiser)

    def forward(self, x: Tensor, t: Tensor, s: Tensor,
                class_labels: Optional[Tensor] = None) -> Tensor:
        B = x.shape[0]
        t = t.to(x.device).reshape(-1).expand(B)
        s = s.to(x.device).reshape(-1).expand(B)
        f, g = self.precond(t, s)                                         # float64, [B]
        F = self.network(x, t.to(x.dtype), s.to(x.dtype), class_labels)
        return jump(x, F, t, f, g, self.sigma_data, self.jumps_denoiser)


def make_meta(precond, *, sigma_data, t_min, t_max, rho, shape, num_classes, dtype,
              **extra) -> dict:
    meta = {"format": FORMAT, "version": VERSION, "precond": precond.name,
            "variant": precond.variant or None, "sigma_data": sigma_data, "t_min": t_min,
            "t_max": t_max, "rho": rho, "shape": list(shape), "num_classes": int(num_classes),
            "dtype": dtype, "ctmkit_version": __version__}
    meta.update(extra)
    return meta


def script(module: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # TorchScript is deprecated in 2.14
        return torch.jit.script(module)


_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16", torch.int64: "int64", torch.int32: "int32",
                torch.uint8: "uint8", torch.int8: "int8", torch.bool: "bool"}


def payload_digest(module) -> str:
    """SHA-256 of a (scripted) module's tensors, ``meta.json``'s ``payload_sha256``: for every
    parameter and buffer in name order, ``name \n dtype \n d0,d1,.. \n nbytes \n`` and the raw
    little-endian bytes. ctm_sample (cpp_runtime/integrity.cpp) computes the same."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    h = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        head = f"{name}\n{_DTYPE_NAMES.get(t.dtype, str(t.dtype))}\n" \
               f"{','.join(map(str, t.shape))}\n{len(raw)}\n"
        h.update(head.encode())
        h.update(raw)
    return h.hexdigest()


def export(jumper: Jumper, path: str | Path, meta: dict) -> None:
    """Script the jumper and save it atomically with ``meta.json`` (and the digest of its
    tensors) inside the archive; serialised in memory first, so a full disk is a clean error."""
    import io

    scripted = script(jumper.eval())
    meta = {**meta, "payload_sha256": payload_digest(scripted)}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, buf, _extra_files={"meta.json": json.dumps(meta)})
    write_bytes(path, buf.getvalue())


def validate_meta(meta: dict, where: str) -> dict:
    missing = [k for k in META_KEYS if k not in meta]
    if meta.get("format") != FORMAT:
        raise UserError(f"{where}: not a ctmkit jumper (meta.json format is "
                        f"{meta.get('format')!r})")
    if missing:
        raise UserError(f"{where}: meta.json lacks {', '.join(missing)}")
    if meta["version"] != VERSION:
        raise UserError(f"{where}: jumper format version {meta['version']} is not supported")
    try:
        ok = (0 < float(meta["t_min"]) < float(meta["t_max"]) and float(meta["rho"]) > 0
              and float(meta["sigma_data"]) > 0 and isinstance(meta["shape"], list)
              and meta["shape"] and all(isinstance(n, int) and n > 0 for n in meta["shape"])
              and isinstance(meta["num_classes"], int) and meta["num_classes"] >= 0
              and meta["dtype"] in ("float32", "float64")
              and all(math.isfinite(float(meta[k])) for k in ("t_min", "t_max", "rho")))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{where}: meta.json is inconsistent (t_min < t_max, rho > 0, "
                        f"sigma_data > 0, a shape of positive integers and dtype float32 | float64 are required)")
    return meta


def load(path: str | Path, device: str = "cpu"):
    """(scripted jumper, meta) from an exported file; one-line errors for bad files."""
    extra = {"meta.json": ""}
    module = jit_load(Path(path), "jumper", device, extra_files=extra)
    if not extra["meta.json"]:
        raise UserError(f"{path}: not a ctmkit jumper (no meta.json inside)")
    meta = load_json(extra["meta.json"], str(path), "meta.json")    # core.bounds: size, depth
    if not isinstance(meta, dict):
        raise UserError(f"{path}: meta.json is not a JSON object")
    validate_meta(meta, str(path))
    if meta.get("payload_sha256") != payload_digest(module):
        raise UserError(f"{path}: jumper is corrupt or altered (SHA-256 of its tensors does not "
                        f"match meta.json's payload_sha256)" if "payload_sha256" in meta else
                        f"{path}: meta.json has no payload_sha256 (exported by an older ctmkit?); "
                        f"rerun 'export'")
    _probe(module.eval(), meta, str(path), device)
    return module, meta


def _probe(module, meta: dict, where: str, device: str) -> None:
    """One jump of one sample of meta's shape: a meta.json that does not fit the network is
    a one-line error here, not a traceback in the middle of sampling."""
    x = torch.zeros([1, *meta["shape"]], dtype=DTYPES_BY_NAME[meta["dtype"]], device=device)
    t = torch.full([1], float(meta["t_max"]), dtype=torch.float64, device=device)
    s = torch.full([1], float(meta["t_min"]), dtype=torch.float64, device=device)
    labels = torch.zeros([1], dtype=torch.long, device=device) if meta["num_classes"] else None
    try:
        with torch.no_grad():
            out = module(x, t, s, labels)
    except Exception as e:  # noqa: BLE001 - any failure of the scripted graph is the file's
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else e.__class__.__name__
        raise UserError(f"{where}: meta.json (shape {meta['shape']}, num_classes "
                        f"{meta['num_classes']}) does not fit the network ({first})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
        raise UserError(f"{where}: the jumper returns {getattr(out, 'shape', type(out))}, "
                        f"not meta.json's shape {meta['shape']}")
