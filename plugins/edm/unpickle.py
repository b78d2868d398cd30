"""Read NVlabs EDM snapshot pickles without running anything they contain.

An EDM ``network-snapshot-*.pkl`` is ``pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=...,
dataset_kwargs=...))`` where every network (and the loss / augmentation objects) is a
*persistent* object: it unpickles through ``torch_utils.persistence._reconstruct_persistent_obj
(meta)``, and the stock loader ``exec``s ``meta['module_src']`` (the full source of EDM's
networks.py) to rebuild the class. This module never does: its ``pickle.Unpickler`` resolves
globals through an allow-list and maps

* ``torch_utils.persistence._reconstruct_persistent_obj`` -> :class:`PersistentStub` (keeps
  ``class_name``, ``state`` and the init kwargs; ``module_src`` is dropped unread);
* plain ``torch.nn.modules.*`` classes (e.g. the ``ModuleDict`` holding ``enc``) ->
  :class:`ModuleStub` (keeps the class name and ``__dict__``; nothing of torch.nn is run);
* ``dnnlib.util.EasyDict`` -> :class:`EasyDict` (a plain dict subclass);
* ``collections.OrderedDict``; torch's tensor / parameter rebuild functions (argument-checked);
  ``torch.storage._load_from_bytes`` -> the storage bytes read by ``torch.load(...,
  weights_only=True)``; numpy's numeric ``dtype`` and ``scalar`` reconstructors (numbers only);
  torch dtypes.

Any other global ends the load with a one-line ``UserError`` naming it; so do truncated,
non-pickle and foreign files (a pickle without an ``ema`` network).

:func:`edm_network_spec` turns the ``ema`` stub into (precond class name, its init kwargs, a
flat state dict with EDM's parameter names such as ``model.enc.16x16_conv.weight``), which
``plugins.edm.precond.build_precond`` / ``load_edm_network`` turn into ctmkit's own modules.
"""

import collections
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from core.base.bounds import check_graph
from core.base.errors import UserError, first_line

#: precond classes ctmkit re-implements (plugins.edm.precond)
KNOWN_PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond")

_NUMERIC_DTYPES = {np.dtype(c).str[1:] for c in "?bBhHiIlLqQefdgFDG"} | \
    {np.dtype(c).name for c in "?bBhHiIlLqQefdFD"} | {"b1", "f", "d"}


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a dict whose keys also read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class PersistentStub:
    """What ``_reconstruct_persistent_obj(meta)`` returns here: the object's class name and its
    pickled ``__dict__`` (``state``), never an instance of the class."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict) \
                or not isinstance(meta.get("class_name"), str):
            raise _Refused("a persistent object without class_name/state")
        self.type = meta.get("type")
        self.version = meta.get("version")
        self.class_name: str = meta["class_name"]
        self.state: dict = meta["state"]
        self.init_args = tuple(self.state.get("_init_args", ()) or ())
        self.init_kwargs: dict = dict(self.state.get("_init_kwargs", {}) or {})

    def __repr__(self):
        return f"PersistentStub({self.class_name})"


class ModuleStub:
    """A plain ``torch.nn`` module from the pickle (e.g. ``ModuleDict``): its name and state."""

    class_name = "torch.nn.Module"

    def __init__(self, *args):
        if args:
            raise _Refused(f"{self.class_name} built with arguments")
        self.state: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise _Refused(f"{self.class_name} with a non-dict state")
        self.state = state

    def __repr__(self):
        return f"ModuleStub({self.class_name})"


class _Refused(Exception):
    """Internal: a structurally bad pickle (turned into a UserError by load_edm_snapshot)."""


_module_stub_types: Dict[str, type] = {}


def _module_stub(module: str, name: str) -> type:
    full = f"{module}.{name}"
    if full not in _module_stub_types:
        _module_stub_types[full] = type(name, (ModuleStub,), {"class_name": full})
    return _module_stub_types[full]


def _reconstruct_persistent_obj(meta):
    return PersistentStub(meta)


def _load_storage(data):
    """``torch.storage._load_from_bytes``: the storage's legacy torch.save bytes, read with
    torch's weights-only unpickler."""
    if not isinstance(data, (bytes, bytearray)):
        raise _Refused("storage data that is not bytes")
    return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)


def _is_storage(obj) -> bool:
    return isinstance(obj, (torch.UntypedStorage, torch.TypedStorage))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not _is_storage(storage) or not isinstance(storage_offset, int) \
            or not all(isinstance(v, int) for v in tuple(size) + tuple(stride)):
        raise _Refused("a tensor with malformed storage/size/stride")
    if backward_hooks:
        raise _Refused("a tensor with backward hooks")
    t = torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))
    t.requires_grad = bool(requires_grad) and t.is_floating_point()
    return t


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, torch.Tensor):
        raise _Refused("a parameter whose data is not a tensor")
    if backward_hooks:
        raise _Refused("a parameter with backward hooks")
    return torch.nn.Parameter(data.detach(), requires_grad=bool(requires_grad))


def _np_dtype(name, align=False, copy=False):
    if not isinstance(name, str) or name not in _NUMERIC_DTYPES:
        raise _Refused(f"numpy dtype {name!r}")
    return np.dtype(name)


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" \
            or not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise _Refused("a non-numeric numpy scalar")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, label: str):
        super().__init__(file)
        self.label = label

    def find_class(self, module, name):
        fn = _ALLOWED.get((module, name))
        if fn is not None:
            return fn
        if module.startswith("torch.nn.modules.") and name.isidentifier() and name[:1].isupper():
            return _module_stub(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UserError(f"{self.label}: refuses to load global {module}.{name} "
                        f"(only network weights are read)")

    def persistent_load(self, pid):
        raise UserError(f"{self.label}: refuses to load a persistent id (only network weights "
                        f"are read)")


def load_edm_snapshot(path: Union[str, Path]) -> dict:
    """Read an EDM snapshot pickle; returns its top-level dict with persistent objects as
    :class:`PersistentStub` (``snap['ema']`` is the network). Raises ``UserError`` (one line) for
    a missing, truncated, non-pickle or foreign file and for any global off the allow-list."""
    path = Path(path)
    label = path.name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read EDM snapshot ({e.strerror or e})") from None
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), label).load()
    except UserError:
        raise
    except _Refused as e:
        raise UserError(f"{label}: not a readable EDM snapshot ({e})") from None
    except (EOFError, pickle.UnpicklingError) as e:
        why = "truncated" if isinstance(e, EOFError) or "truncated" in str(e) else \
            f"not a pickle: {first_line(e, None)}"
        raise UserError(f"{label}: not a readable EDM snapshot ({why})") from None
    except Exception as e:                       # malformed opcodes, bad tensor data, ...
        raise UserError(f"{label}: not a readable EDM snapshot ({type(e).__name__}: "
                        f"{first_line(e, None)})") from None
    check_graph(obj, label)       # before anything walks it: shared-reference bombs, depth
    if not isinstance(obj, dict) or not isinstance(obj.get("ema"), PersistentStub):
        raise UserError(f"{label}: not an EDM network snapshot (no 'ema' network in the "
                        f"pickle)")
    snap = dict(obj)
    snap["_source"] = label
    return snap


@dataclass
class EDMNetworkSpec:
    """What ctmkit needs to rebuild an EDM network: the precond class name (no module prefix),
    its init kwargs (including ``model_type`` and the network kwargs) and the flat state dict
    with EDM's names (``model.map_layer0.weight``, ``model.enc.16x16_conv.weight``, ...)."""
    class_name: str
    init_kwargs: Dict[str, Any]
    state_dict: Dict[str, torch.Tensor]
    source: str = "<snapshot>"


def _plain(value):
    """numpy scalars -> Python numbers, EasyDict -> dict, recursively (for init kwargs)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def flat_state_dict(stub, label: str = "<snapshot>") -> Dict[str, torch.Tensor]:
    """Walk ``_parameters``, persistent ``_buffers`` and ``_modules`` recursively."""
    out: Dict[str, torch.Tensor] = {}

    def walk(node, prefix):
        if not isinstance(node, (PersistentStub, ModuleStub)):
            raise UserError(f"{label}: the network holds a {type(node).__name__} where a module "
                            f"belongs ({prefix.rstrip('.') or 'top level'})")
        st = node.state
        non_persistent = set(st.get("_non_persistent_buffers_set", ()) or ())
        for kind in ("_parameters", "_buffers"):
            for name, t in (st.get(kind) or {}).items():
                if t is None or (kind == "_buffers" and name in non_persistent):
                    continue
                if not isinstance(t, torch.Tensor):
                    raise UserError(f"{label}: {prefix}{name} is not a tensor")
                out[prefix + name] = t.detach()
        for name, child in (st.get("_modules") or {}).items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(stub, "")
    return out


def edm_network_spec(snapshot: Union[dict, PersistentStub], key: str = "ema") -> EDMNetworkSpec:
    """The precond class name, init kwargs and flat state dict of ``snapshot[key]``."""
    label = snapshot.get("_source", "<snapshot>") if isinstance(snapshot, dict) else "<snapshot>"
    stub = snapshot.get(key) if isinstance(snapshot, dict) else snapshot
    if not isinstance(stub, PersistentStub):
        raise UserError(f"{label}: no {key!r} network in the snapshot")
    check_graph(stub, label)      # a snapshot dict built elsewhere: bounded before the walks
    class_name = stub.class_name.rsplit(".", 1)[-1]
    if class_name not in KNOWN_PRECONDS:
        raise UserError(f"{label}: unsupported EDM network class {stub.class_name!r} "
                        f"(supported: {', '.join(KNOWN_PRECONDS)})")
    if stub.init_args:
        raise UserError(f"{label}: {class_name} pickled with positional init arguments")
    return EDMNetworkSpec(class_name, _plain(stub.init_kwargs), flat_state_dict(stub, label),
                          label)
