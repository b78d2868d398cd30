"""Loading data arrays (x_0 for coefficient estimation and evaluation) from .npy / .npz / HDF5."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from core.base.errors import UserError
from core.base.io import regular_file

X_KEYS, Y_KEYS = ("x", "data", "images", "arr_0"), ("y", "labels")


def check_array_sizes(path: Path) -> None:
    """Check every .npy array in `path` (.npy, or the members of .npz) against its header
    before numpy allocates it: a header that claims more data than the file holds is refused."""
    import numpy.lib.format as fmt

    def check(fh, size: int, where: str) -> None:
        try:
            version = fmt.read_magic(fh)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(fh)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{where}: unreadable data file (not a .npy array: "
                            f"{e.__class__.__name__})") from None
        if dtype.hasobject:
            raise UserError(f"{where}: holds Python objects; only numeric arrays are read")
        need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if need > size - fh.tell():
            raise UserError(f"{where}: unreadable, truncated or corrupt (its header claims "
                            f"{list(shape)} {dtype}, {need} bytes, but it holds "
                            f"{size - fh.tell()})")

    path = regular_file(path)
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as fh:
                check(fh, path.stat().st_size, str(path))
        elif path.suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if info.filename.endswith(".npy"):
                        with z.open(info) as fh:
                            check(fh, info.file_size, f"{path}:{info.filename}")
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path}: unreadable data file ({e.__class__.__name__})") from None


#: an HDF5 dataset stored with filters (compression) may hold at most this many times the
#: file's size; an unfiltered one at most the file's size (what its header claims is checked
#: before anything is read)
H5_MAX_RATIO = 1000
#: what a failing h5py / numpy read raises (h5py's errors subclass these; numpy's warnings
#: are raised as errors while a file is read, so that none is printed)
READ_ERRORS = (ValueError, OSError, EOFError, KeyError, TypeError, RuntimeError, IndexError,
               zipfile.BadZipFile, Warning)


def check_h5_dataset(ds, where: str, file_size: int) -> None:
    """Refuse HDF5 dataset `ds` before reading it when its dtype is not numeric, its data lives
    outside the file (external or virtual storage), or its header claims more bytes than the
    file can hold (`H5_MAX_RATIO` times the file's size when compressed)."""
    if ds.dtype.kind not in "biuf":
        raise UserError(f"{where}: holds {ds.dtype} values; only numeric arrays are read")
    if ds.is_virtual or ds.external:
        raise UserError(f"{where}: its data is stored outside the file (external or virtual "
                        f"dataset); not read")
    need = int(np.prod(ds.shape, dtype=np.float64)) * ds.dtype.itemsize
    filtered = ds.id.get_create_plist().get_nfilters() > 0
    bound = file_size * (H5_MAX_RATIO if filtered else 1)
    if need > bound:
        raise UserError(f"{where}: unreadable, truncated or corrupt (its header claims "
                        f"{list(ds.shape)} {ds.dtype}, {need} bytes, but the file holds "
                        f"{file_size}{f' (x{H5_MAX_RATIO} compressed)' if bound > file_size else ''})")


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


def _pick(names, keys):
    return next((k for k in keys if k in names), None)


def read_array_file(path: Path, what: str = "data") -> tuple[np.ndarray, np.ndarray | None]:
    """(x, labels or None) as stored in a .npy, .npz (x: ``X_KEYS``, labels: ``Y_KEYS``) or
    HDF5 file, sizes checked before anything is allocated; one-line errors ("unreadable
    <what> file") for bad files. The one array reader of [data] files and the ``array``
    dataset plugin."""
    path = regular_file(path)
    check_array_sizes(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".h5", ".hdf5"):
        raise UserError(f"{path}: unsupported {what} file (use .npy, .npz, .h5 or .hdf5)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")        # a warning while reading: the file's fault
            return _read_arrays(path, suffix)
    except UserError:
        raise
    except READ_ERRORS as e:
        raise UserError(f"{path}: unreadable {what} file ({one_line(e)})") from None


def _read_arrays(path: Path, suffix: str):
    """read_array_file's reading, after its checks: (x, labels or None)."""
    if suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            xk, yk = _pick(z.files, X_KEYS), _pick(z.files, Y_KEYS)
            if xk is None:
                raise UserError(f"{path}: no array named {' / '.join(X_KEYS)}")
            return z[xk], (z[yk] if yk else None)
    import h5py

    with h5py.File(path, "r") as f:
        xk, yk = _pick(f, X_KEYS), _pick(f, Y_KEYS)
        if xk is None:
            raise UserError(f"{path}: no dataset named {' / '.join(X_KEYS)}")
        for k in (xk, yk):
            if k is not None and not isinstance(f[k], h5py.Dataset):
                raise UserError(f"{path}: {k!r} is a group, not a dataset")
            if k is not None:
                check_h5_dataset(f[k], f"{path}:{k}", path.stat().st_size)
        return f[xk][()], (f[yk][()] if yk else None)


def load_arrays(path: Path, shape: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x [N, *shape] float64, labels [N] int64 or None); one-line errors on bad files."""
    x, y = read_array_file(path, "data")
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[0] < 1 or tuple(x.shape[1:]) != tuple(shape):
        raise UserError(f"{path}: data has shape {x.shape}, expected [N, {', '.join(map(str, shape))}]")
    if x.dtype.kind not in "biuf" or not np.all(np.isfinite(x)):
        raise UserError(f"{path}: data must be finite real numbers, got {x.dtype}"
                        if x.dtype.kind not in "biuf" else f"{path}: data must be finite numbers")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{path}: labels must be {len(x)} integers, got {y.shape} {y.dtype}")
        y = torch.from_numpy(y.astype(np.int64))
    try:
        with np.errstate(over="raise", invalid="raise"):   # float128 beyond float64
            return torch.from_numpy(x.astype(np.float64)), y
    except FloatingPointError:
        raise UserError(f"{path}: data values do not fit float64") from None


class DataSource:
    """The `[data]` section: x_0 from a dataset plugin (``format = "idx"``, ``"folder"``, ...; see
    plugins/datasets.py), a plain array file (``path`` alone: vectors, used as they are) or an
    analytic Gaussian mixture (``gmm = {...}``)."""

    def __init__(self, section, ctx=None):
        self.section = section
        self.dataset, self.gmm = None, None
        if section.has("format"):
            from types import SimpleNamespace

            from core.data.datasets import load
            self.dataset = load(section, ctx or SimpleNamespace(base_dir=section.base_dir))
            self.path, self.shape = None, self.dataset.shape
            self._x, self.y = None, self.dataset.y       # x: read from the dataset on demand
            self._loaded = True
            return
        self.path = section.path("path", None)
        gmm = section._get("gmm", None)
        if (self.path is None) == (gmm is None):
            section.fail("path", "give exactly one of path = \"x0.npy\" (with format = ... for "
                         "image datasets) or gmm = {weights, means, stds}")
        if gmm is not None:
            from types import SimpleNamespace

            from core.host.config import Section
            from core.host.plugins import build

            # the analytic mixture is the built-in ``gmm`` teacher's, fetched by name
            self.gmm = build("teacher", "gmm", Section("data.gmm", gmm, section.source,
                                                       section.base_dir),
                             ctx or SimpleNamespace(base_dir=section.base_dir),
                             section.where("gmm"))
            self.shape, self.x, self.y = self.gmm.shape, None, None
        else:
            self.shape = tuple(section.shape("shape", None) or ())
        section.finish()
        self._loaded = False

    @property
    def x(self):
        """All examples as one tensor (a dataset's: materialised on access; ctmkit's own
        readers sample by index instead)."""
        return self.dataset.x if self.dataset is not None else self._x

    @x.setter
    def x(self, value) -> None:
        self._x = value

    @classmethod
    def from_file(cls, path: Path, shape: tuple) -> "DataSource":
        """A source reading `path` (a stage's own `data` key) for samples of `shape`: images
        ([C, H, W]) through the `array` dataset plugin (scaled to [-1, 1] like [data]), vectors
        as stored."""
        from core.host.config import Section
        options = {"path": str(path)}
        if len(shape) == 3:
            options["format"] = "array"
        return cls(Section("data", options, str(path), Path("."))).load(shape)

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def load(self, shape=None):
        if self.dataset is not None:
            if shape is not None and tuple(shape) != tuple(self.shape):
                raise UserError(f"{self.section.where('path')}: the data has shape "
                                f"{list(self.shape)} but the teacher expects {list(shape)}")
        elif self.gmm is None and not self._loaded:
            if shape is None and not self.shape:
                check_array_sizes(self.path)
                probe = np.load(self.path, mmap_mode="r") if self.path.suffix == ".npy" else None
                shape = tuple(probe.shape[1:]) if probe is not None else None
                if shape is None:
                    self.section.fail("shape", "is required for .npz / .h5 data")
            self.x, self.y = load_arrays(self.path, tuple(shape or self.shape))
            self.shape = tuple(self.x.shape[1:])
            self._loaded = True
        return self

    @property
    def num_classes(self) -> int:
        if self.gmm is not None:
            return self.gmm.num_classes
        self.load()
        return 0 if self.y is None else int(self.y.max()) + 1

    def sample(self, n: int, generator: torch.Generator):
        if self.gmm is not None:
            return self.gmm.sample_data(n, generator)
        if self.dataset is not None:
            return self.dataset.sample(n, generator)
        self.load()
        idx = torch.randint(0, len(self.x), (n,), generator=generator)
        return self.x[idx], (self.y[idx] if self.y is not None else None)

    def sample_rows(self, n: int, generator: torch.Generator, keep: slice):
        """Rows `keep` of ``sample(n, generator)`` (the same draws): a dataset reads only
        these rows; an analytic mixture or an in-memory array draws all n and slices."""
        if self.dataset is not None:
            return self.dataset.sample_rows(n, generator, keep)
        x, y = self.sample(n, generator)
        return x[keep], (y[keep] if y is not None else None)

    def as_dataset(self):
        """The examples as a `core.data.datasets.Dataset` (the reference set of the metrics)."""
        from core.data.datasets import Dataset

        if self.dataset is not None:
            return self.dataset
        if self.gmm is not None:
            raise UserError(f"{self.section.where('gmm')}: an analytic mixture has no finite "
                            f"set of examples for image metrics")
        self.load()
        return Dataset(self.x.float(), self.y, self.fingerprint())

    def fingerprint(self) -> str:
        if self.gmm is not None:
            return self.gmm.fingerprint()
        if self.dataset is not None:
            return self.dataset.fingerprint()
        from core.base.io import file_digest
        return "file:" + file_digest(regular_file(self.path))[:32]
