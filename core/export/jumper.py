"""The jumper: the consistency function f_theta(x, t, s) as one TorchScript-able module, and its
export / load (docs/design.md, "Exported jumper").

    f_theta(x, t, s) = f(t, s) x + g(t, s) D_theta(x, t, s),  D_theta = c_skip x + c_out F_theta
    (or f x + g F_theta for preconditionings with ``jumps_denoiser = False``; Table 1): `jump`

The file is a TorchScript archive whose extra file ``meta.json`` describes it, sealed by the
extra file ``archive_sha256``, the digest of every other record (core/base/integrity.py), checked
before anything of the file is deserialised; the same file is what the C++ ``ctm_sample`` loads.
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
from core.base import dtypes
from core.diffusion.edm import TeacherAsNetwork  # noqa: F401  (re-exported)
from core.diffusion.edm import append_dims, denoiser_from_output
from core.base.bounds import load_json
from core.base.errors import UserError, first_line
from core.base.integrity import check_archive, seal_archive
from core.base.io import jit_load, regular_file, write_bytes

FORMAT, VERSION = "ctmkit.jumper", 1
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


def payload_digest(module) -> str:
    """SHA-256 of a (scripted) module's tensors, ``meta.json``'s ``payload_sha256``: for every
    parameter and buffer in name order, ``name \n dtype \n d0,d1,.. \n nbytes \n`` and the raw
    little-endian bytes. ctm_sample (cpp_runtime/jumper_torchscript.cpp) computes the same;
    the whole-archive digest (core/base/integrity.py) covers everything else in the file."""
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    h = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        head = f"{name}\n{dtypes.NAMES.get(t.dtype, str(t.dtype))}\n" \
               f"{','.join(map(str, t.shape))}\n{len(raw)}\n"
        h.update(head.encode())
        h.update(raw)
    return h.hexdigest()


def export(jumper: Jumper, path: str | Path, meta: dict) -> None:
    """Script the jumper and save it atomically with ``meta.json`` (and the digest of its
    tensors) inside the archive, sealed with the whole-archive digest (core/base/integrity.py);
    serialised in memory first, so a full disk is a clean error."""
    import io

    scripted = script(jumper.eval())
    meta = {**meta, "payload_sha256": payload_digest(scripted)}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, buf, _extra_files={"meta.json": json.dumps(meta)})
    write_bytes(path, seal_archive(buf.getvalue()))


#: bounds of meta.json, the same in cpp_runtime/meta.cpp (tests/fixtures/meta_cases.json):
#: dimensions of one sample, values in one sample, classes, nesting depth of any value
MAX_SHAPE_DIMS = 8
MAX_SAMPLE_NUMEL = 1 << 24
MAX_NUM_CLASSES = (1 << 31) - 1
MAX_JSON_DEPTH = 64


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_depth(value) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), without recursion."""
    depth, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        depth = max(depth, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return depth


def parse_meta(text, where: str) -> dict:
    """meta.json's text (str or bytes) -> the validated dict; one-line UserError otherwise."""
    meta = load_json(text, where, "meta.json", limit=MAX_JSON_DEPTH)   # core.base.bounds: size
    if not isinstance(meta, dict):
        raise UserError(f"{where}: meta.json is not a JSON object")
    return validate_meta(meta, where)


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with a meta.json that has all META_KEYS and the right format and version
    (None: nothing); the rules of cpp_runtime/meta.cpp: parse_meta."""
    for key in ("precond", "dtype", "ctmkit_version"):
        if not isinstance(meta[key], str):
            return f"{key} is not a string"
    if meta["variant"] is not None and not isinstance(meta["variant"], str):
        return "variant is neither a string nor null"
    for key in ("sigma_data", "t_min", "t_max", "rho"):
        if not _is_number(meta[key]):
            return f"{key} is not a number"
        if not math.isfinite(meta[key]):
            return f"{key} is not finite"
    if not 0 < meta["t_min"] < meta["t_max"]:
        return "0 < t_min < t_max is required"
    if not meta["rho"] > 0:
        return "rho > 0 is required"
    if not meta["sigma_data"] > 0:
        return "sigma_data > 0 is required"
    if meta["dtype"] not in dtypes.JUMPER:
        return f"dtype {meta['dtype']!r} is neither float32 nor float64"
    shape = meta["shape"]
    if not (isinstance(shape, list) and shape and all(_is_int(n) and n > 0 for n in shape)):
        return "shape must be a non-empty list of positive integers"
    if len(shape) > MAX_SHAPE_DIMS or math.prod(shape) > MAX_SAMPLE_NUMEL:
        return (f"shape is too large (at most {MAX_SHAPE_DIMS} dimensions and "
                f"{MAX_SAMPLE_NUMEL} values per sample)")
    if not (_is_int(meta["num_classes"]) and 0 <= meta["num_classes"] <= MAX_NUM_CLASSES):
        return f"num_classes must be an integer in 0..{MAX_NUM_CLASSES}"
    digest = meta.get("payload_sha256")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        return "payload_sha256 must be a 64-digit hex string"
    if _json_depth(meta) > MAX_JSON_DEPTH:
        return f"nested deeper than {MAX_JSON_DEPTH} levels"
    return None


def validate_meta(meta: dict, where: str) -> dict:
    """`meta` if it is a consistent ctmkit jumper meta.json; one-line UserError otherwise."""
    missing = [k for k in META_KEYS if k not in meta]
    if meta.get("format") != FORMAT:
        raise UserError(f"{where}: not a ctmkit jumper (meta.json format is "
                        f"{meta.get('format')!r})")
    if missing:
        raise UserError(f"{where}: meta.json lacks {', '.join(missing)}")
    if not _is_number(meta["version"]) or meta["version"] != VERSION:
        raise UserError(f"{where}: jumper format version {meta['version']} is not supported")
    problem = _meta_problem(meta)
    if problem:
        raise UserError(f"{where}: meta.json is inconsistent ({problem})")
    return meta


def load(path: str | Path, device: str = "cpu"):
    """(scripted jumper, meta) from an exported file; one-line errors for bad files. The file
    is read once; its whole-archive digest is checked on those bytes before TorchScript sees
    them (a flipped bit in the code, data.pkl or meta.json is refused, not run)."""
    import io

    data = read_jumper_bytes(path)
    check_archive(data, str(path))
    extra = {"meta.json": ""}
    module = jit_load(io.BytesIO(data), "jumper", device, extra_files=extra, where=path)
    if not extra["meta.json"]:
        raise UserError(f"{path}: not a ctmkit jumper (no meta.json inside)")
    meta = parse_meta(extra["meta.json"], str(path))
    if meta.get("payload_sha256") != payload_digest(module):
        raise UserError(f"{path}: jumper is corrupt or altered (SHA-256 of its tensors does not "
                        f"match meta.json's payload_sha256)" if "payload_sha256" in meta else
                        f"{path}: meta.json has no payload_sha256 (exported by an older ctmkit?); "
                        f"rerun 'export'")
    _probe(module.eval(), meta, str(path), device)
    return module, meta


def read_jumper_bytes(path: str | Path) -> bytes:
    """The bytes of the jumper file `path` (a regular file), read once: what is checked is what
    is loaded."""
    try:
        return regular_file(path, "jumper file").read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the jumper file ({e.strerror or e})") from None


def _probe(module, meta: dict, where: str, device: str) -> None:
    """One jump of one sample of meta's shape: a meta.json that does not fit the network is
    a one-line error here, not a traceback in the middle of sampling."""
    x = torch.zeros([1, *meta["shape"]], dtype=dtypes.DTYPES[meta["dtype"]], device=device)
    t = torch.full([1], float(meta["t_max"]), dtype=torch.float64, device=device)
    s = torch.full([1], float(meta["t_min"]), dtype=torch.float64, device=device)
    labels = torch.zeros([1], dtype=torch.long, device=device) if meta["num_classes"] else None
    try:
        with torch.no_grad():
            out = module(x, t, s, labels)
    except Exception as e:  # noqa: BLE001 - any failure of the scripted graph is the file's
        first = first_line(e)
        raise UserError(f"{where}: meta.json (shape {meta['shape']}, num_classes "
                        f"{meta['num_classes']}) does not fit the network ({first})") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
        raise UserError(f"{where}: the jumper returns {getattr(out, 'shape', type(out))}, "
                        f"not meta.json's shape {meta['shape']}")
