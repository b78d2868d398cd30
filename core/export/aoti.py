"""The jumper as an AOTInductor package (``.pt2``): export and load.

TorchScript (core/export/jumper.py: export) is deprecated from torch 2.14; its successor is
``torch.export`` + AOTInductor. ``export_aoti`` exports the eager ``Jumper`` with a dynamic batch
dimension and compiles it ahead of time into a ``.pt2`` package (a zip holding a shared library
with the generated kernels and the weights). The C++ ``ctm_sample`` loads the same file with
``torch::inductor::AOTIModelPackageLoader`` (cpp_runtime/jumper_aoti.cpp).

The package's entry point takes positional tensors only:

* unconditional models (``meta["num_classes"] == 0``): ``(x, t, s)``;
* class-conditional models: ``(x, t, s, class_labels)``;

with ``x [B, *shape]`` of the jumper's dtype, ``t, s [B]`` of x's dtype, ``class_labels [B]``
int64, and B >= 1 free. It returns f(x, t, s) shaped like x.

meta.json (the same JSON text as in a TorchScript jumper, core/export/jumper.py: make_meta) is stored as
AOTInductor package metadata (``inductor_configs["aot_inductor.metadata"]``), under the key
``"meta.json"``; C++ reads it with ``AOTIModelPackageLoader::load_metadata_from_package(path,
"model")`` (or ``get_metadata()``), Python with ``load_aoti``. A second key,
``"ctmkit.inputs"``, names the entry point's inputs (``"x,t,s"`` or ``"x,t,s,class_labels"``).

Every package has a sidecar ``<name>.pt2.sha256`` (core/base/integrity.py) with the SHA-256 of the
whole file: ``load_aoti`` and ctm_sample read the file once, check that digest, and only then
read its metadata and load its library, from a private copy in a temporary folder (where
AOTInductor also extracts the library) that is removed again, also when the load fails.

A package is compiled for one device type (the device of the jumper's parameters and buffers
when exported: CPU unless moved) and, on CPU, for the instruction set of the exporting machine;
it needs the same torch version to load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from core.base.dtypes import DTYPES
from core.base.errors import UserError, first_line
from core.base.integrity import check_sidecar, write_sidecar
from core.base.io import atomic_path
from core.export.jumper import parse_meta, read_jumper_bytes, validate_meta

MODEL_NAME = "model"          # aoti_compile_and_package's default
META_KEY = "meta.json"
INPUTS_KEY = "ctmkit.inputs"
INPUTS_UNCONDITIONAL = "x,t,s"
INPUTS_CONDITIONAL = "x,t,s,class_labels"


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _quiet_torch_logs():
    """Holds back torch's log warnings that are noise here: cpp_extension's "No CUDA runtime is
    found" (the CUDA wheel on a machine without a GPU, expected for a CPU package) and the
    package loader's "Loading outdated pt2 file" (a foreign file, reported as a UserError)."""
    loggers = [logging.getLogger(name) for name in ("torch.utils.cpp_extension",
                                                    "torch._inductor.package.package")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def export_aoti(jumper: nn.Module, path: str | Path, meta: dict, example_batch: int = 2) -> None:
    """Export ``jumper`` (an eager ``core.export.jumper.Jumper``, not a scripted one) with a dynamic
    batch dimension and write the AOTInductor package ``path`` (which must end in ``.pt2``)
    atomically, with ``meta`` embedded as its ``meta.json`` metadata, and then its digest
    sidecar ``path.sha256`` (core/base/integrity.py: write_sidecar). Raises ``UserError`` for
    a bad path or meta; an exception from torch.export / AOTInductor (a network that cannot be
    exported) propagates unchanged, and nothing is written then.

    ``meta`` is the dict of ``core.export.jumper.make_meta``; its ``shape``, ``dtype`` and
    ``num_classes`` fix the example inputs and the signature. ``example_batch`` (>= 2; a batch of
    1 would be specialised by torch.export) only sizes the example inputs. Compilation runs a
    C++ compiler and takes seconds to a minute.
    """
    if isinstance(jumper, torch.jit.ScriptModule):
        raise TypeError("export_aoti needs the eager jumper (nn.Module), not a scripted one")
    if example_batch < 2:
        raise ValueError(f"example_batch must be >= 2, got {example_batch}")
    if Path(path).suffix != ".pt2":
        raise UserError(f"{path}: an AOTInductor package must be named *.pt2 (ctm_sample picks "
                        f"its loader by extension)")
    meta = validate_meta(dict(meta), str(path))
    meta_text = json.dumps(meta)
    dtype = DTYPES[meta["dtype"]]
    conditional = int(meta["num_classes"]) > 0
    device = _module_device(jumper)
    B = example_batch
    x = torch.randn([B] + list(meta["shape"]), dtype=dtype, device=device)
    # times in the middle of [t_min, t_max] in log scale: inside any coefficient table
    mid = float((meta["t_min"] * meta["t_max"]) ** 0.5)
    t = torch.full((B,), mid, dtype=dtype, device=device)
    s = torch.full((B,), float((meta["t_min"] * mid) ** 0.5), dtype=dtype, device=device)
    args: tuple = (x, t, s)
    batch = torch.export.Dim("batch", min=1)
    dynamic: tuple = ({0: batch}, {0: batch}, {0: batch})
    if conditional:
        args += (torch.zeros(B, dtype=torch.long, device=device),)
        dynamic += ({0: batch},)
    jumper = jumper.eval()
    with torch.no_grad():
        exported = torch.export.export(jumper, args, dynamic_shapes=dynamic)
    configs = {
        "aot_inductor.metadata": {
            META_KEY: meta_text,
            INPUTS_KEY: INPUTS_CONDITIONAL if conditional else INPUTS_UNCONDITIONAL},
        # torch.export assumes dynamic sizes >= 2 (0/1 specialisation) and the run-time input
        # checks (AOTI_RUNTIME_CHECK_INPUTS=1, which ctm_sample sets) would reject a last batch
        # of 1; the generated code is size-generic, and the tests run batches of 1
        "aot_inductor.check_lowerbound": False,
    }
    with _quiet_torch_logs(), atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            # a file object: aoti_compile_and_package wants names ending in .pt2, and the
            # temporary name of atomic_path does not
            torch._inductor.aoti_compile_and_package(exported, package_path=fh,
                                                     inductor_configs=configs)
        data = Path(tmp).read_bytes()
    write_sidecar(path, data)     # after the package: a crash between leaves a refused pair


class AOTIJumper:
    """A loaded ``.pt2`` jumper with the ``Jumper`` call signature
    ``(x, t, s, class_labels=None)``, so that ``core.export.sampling.draw`` and the samplers can use it
    like the eager or the TorchScript jumper. t and s must have shape [B]."""

    def __init__(self, runner, path: str, conditional: bool):
        self.runner, self.path, self.conditional = runner, path, conditional

    def __call__(self, x: Tensor, t: Tensor, s: Tensor,
                 class_labels: Optional[Tensor] = None) -> Tensor:
        if self.conditional:
            if class_labels is None:
                raise ValueError(f"{self.path}: a class-conditional jumper needs class_labels")
            return self.runner(x, t, s, class_labels)
        return self.runner(x, t, s)

    def eval(self) -> "AOTIJumper":
        return self


def load_aoti(path: str | Path, device: str = "cpu") -> tuple[AOTIJumper, dict]:
    """(jumper, meta) from a ``.pt2`` written by ``export_aoti``; one-line ``UserError`` for a
    missing, truncated or foreign file and for a missing or inconsistent meta.json.

    ``device`` must be of the device type the package was compiled for ("cpu" for packages
    exported from a CPU jumper; "cuda" / "cuda:N" for a CUDA one)."""
    path = Path(path)
    data = read_jumper_bytes(path)
    check_sidecar(path, data)       # before anything reads the package, let alone loads it
    folder = tempfile.mkdtemp(prefix="ctmkit-aoti-")
    try:
        jumper, meta = _load_checked(path, data, folder, device)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    # the library stays extracted (in `folder`) while the jumper lives
    weakref.finalize(jumper, shutil.rmtree, folder, True)
    return jumper, meta


@contextlib.contextmanager
def _tmpdir_env(folder: str):
    """TMPDIR = `folder` meanwhile: AOTInductor's loader extracts the package into a fresh
    ``$TMPDIR/aotinductor_*`` and, when loading fails, leaves it there."""
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = folder
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old


def _load_checked(path: Path, data: bytes, folder: str, device: str
                  ) -> tuple[AOTIJumper, dict]:
    """load_aoti after the digest check: `data` (the package's checked bytes) is copied into
    `folder`, which the caller removes."""
    from torch._inductor.package import load_package

    copy = os.path.join(folder, "jumper.pt2")
    with open(copy, "wb") as fh:
        fh.write(data)
    # 1. the metadata alone (no extraction, no dlopen), as ctm_sample does
    try:
        metadata = torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(
            copy, MODEL_NAME)
    except Exception as e:   # zip errors: anything that is not a .pt2
        raise UserError(f"{path}: not a loadable AOTInductor package ({first_line(e, 160)})"
                        ) from None
    if not metadata.get(META_KEY):
        raise UserError(f"{path}: not a ctmkit jumper (no meta.json inside)")
    meta = parse_meta(metadata[META_KEY], str(path))
    conditional = int(meta["num_classes"]) > 0
    inputs = metadata.get(INPUTS_KEY)
    expected = INPUTS_CONDITIONAL if conditional else INPUTS_UNCONDITIONAL
    if inputs != expected:
        raise UserError(f"{path}: meta.json says num_classes = {meta['num_classes']} but the "
                        f"package takes ({inputs or 'unknown inputs'}), not ({expected})")
    dev = torch.device(device)
    built_for = metadata.get("AOTI_DEVICE_KEY", "cpu")
    if built_for != dev.type:
        raise UserError(f"{path}: the package was compiled for {built_for}, not for {dev.type}")
    # 2. extract the package (into `folder`) and load its library
    try:
        with _quiet_torch_logs(), _tmpdir_env(folder):
            runner = load_package(copy, model_name=MODEL_NAME,
                                  device_index=dev.index if dev.index is not None else -1)
    except Exception as e:
        raise UserError(f"{path}: not a loadable AOTInductor package ({first_line(e, 160)})"
                        ) from None
    finally:
        os.unlink(copy)
    return AOTIJumper(runner, str(path), conditional), meta
