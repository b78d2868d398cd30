"""`[data] format = "edm"` (plugins/datasets.py): the zip archives (or folders) NVlabs/edm's
dataset_tool.py writes -- PNGs under 00000/img00000000.png ... and an optional dataset.json --
round-trip exactly, the common options, fingerprints, one-line UserErrors naming the archive and
the member, and the CLI accepting such a config."""

import io
import json
import re
import types
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.host.config import Section
from core.data.datasets import Dataset, load
from core.base.errors import UserError


def _load(tmp_path, **data) -> Dataset:
    section = Section("data", data, "cfg.toml", tmp_path)
    return load(section, types.SimpleNamespace(base_dir=tmp_path))


def _unit(u8) -> np.ndarray:
    """What a uint8 image becomes: x / 127.5 - 1, rounded once to float32."""
    return (np.asarray(u8, np.float64) / 127.5 - 1).astype(np.float32)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="png")
    return buf.getvalue()


def _name(idx: int) -> str:
    """dataset_tool's member name for image `idx`."""
    s = f"{idx:08d}"
    return f"{s[:5]}/img{s}.png"


IDX = [0, 1, 2, 1000, 1001]     # two sub-folders: 00000/ and 00001/


def _images(channels=3, idx=IDX, h=6, w=5, seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, 3)
    return {_name(i): rng.integers(0, 256, shape, dtype=np.uint8) for i in idx}


def write_edm(dest: Path, members: dict, meta=None, compression=zipfile.ZIP_STORED) -> Path:
    """A dataset_tool-style zip (dest ends in .zip) or folder: `members` maps names to arrays
    (written as PNG) or raw bytes, written in reverse order; `meta` is dataset.json (a dict
    or raw bytes; None: no such file)."""
    files = {n: (_png(v) if isinstance(v, np.ndarray) else v) for n, v in members.items()}
    if meta is not None:
        files["dataset.json"] = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    items = list(reversed(files.items()))
    if dest.suffix == ".zip":
        with zipfile.ZipFile(dest, "w", compression=compression) as z:
            for n, raw in items:
                z.writestr(n, raw)
    else:
        for n, raw in items:
            (dest / n).parent.mkdir(parents=True, exist_ok=True)
            (dest / n).write_bytes(raw)
    return dest


def _meta(images: dict, labels) -> dict:
    return {"labels": [[n, int(k)] for n, k in zip(images, labels)]}


def _want(images: dict) -> np.ndarray:
    x = np.stack([images[n] for n in sorted(images)])
    return _unit(x)[:, None] if x.ndim == 3 else _unit(x).transpose(0, 3, 1, 2)


# -- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [3, 1])
def test_zip_round_trip_with_labels(tmp_path, channels):
    images = _images(channels)
    labels = [6, 0, 9, 3, 6]
    extra = {"README.txt": b"not an image", "__MACOSX/00000/._img00000000.png": b"junk"}
    write_edm(tmp_path / "d.zip", {**images, **extra}, _meta(images, labels))
    ds = _load(tmp_path, format="edm", path="d.zip")
    assert ds.x.dtype == torch.float32 and ds.shape == (channels, 6, 5) and len(ds) == 5
    assert np.array_equal(ds.x.numpy(), _want(images))
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == labels and ds.num_classes == 10
    assert ds.name == "edm:d.zip"


@pytest.mark.parametrize("meta", [None, {"labels": None},
                                  {"labels": [[_name(i), None] for i in IDX]}],
                         ids=["no-json", "labels-null", "each-null"])
def test_zip_without_labels(tmp_path, meta):
    images = _images(1, seed=1)
    write_edm(tmp_path / "d.zip", images, meta, compression=zipfile.ZIP_DEFLATED)
    ds = _load(tmp_path, format="edm", path="d.zip")
    assert ds.y is None and ds.shape == (1, 6, 5)
    assert np.array_equal(ds.x.numpy(), _want(images))


def test_folder_layout_matches_zip(tmp_path):
    images = _images(3, seed=2)
    meta = _meta(images, [1, 2, 3, 4, 0])
    write_edm(tmp_path / "d.zip", images, meta)
    write_edm(tmp_path / "d", images, meta)
    (tmp_path / "d" / ".hidden.png").write_bytes(b"skipped")
    z, f = (_load(tmp_path, format="edm", path=p) for p in ("d.zip", "d"))
    assert torch.equal(z.x, f.x) and z.y.tolist() == f.y.tolist() == [1, 2, 3, 4, 0]
    before = f.fingerprint()
    assert _load(tmp_path, format="edm", path="d").fingerprint() == before
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(_meta(images, [0, 2, 3, 4, 0])))
    assert _load(tmp_path, format="edm", path="d").fingerprint() != before


def test_limit_conditional_and_fingerprint(tmp_path):
    images = _images(3, seed=3)
    write_edm(tmp_path / "d.zip", images, _meta(images, [4, 3, 2, 1, 0]))
    full = _load(tmp_path, format="edm", path="d.zip")
    ds = _load(tmp_path, format="edm", path="d.zip", limit=3)
    assert len(ds) == 3 and torch.equal(ds.x, full.x[:3]) and ds.y.tolist() == [4, 3, 2]
    ds = _load(tmp_path, format="edm", path="d.zip", conditional=False)
    assert ds.y is None and torch.equal(ds.x, full.x)
    prints = {_load(tmp_path, format="edm", path="d.zip", **kw).fingerprint()
              for kw in ({}, {"limit": 3}, {"conditional": False}, {"hflip": True})}
    assert len(prints) == 4 and full.fingerprint() in prints
    images[_name(1000)][0, 0, 0] ^= 1
    write_edm(tmp_path / "d.zip", images, _meta(images, [4, 3, 2, 1, 0]))
    assert _load(tmp_path, format="edm", path="d.zip").fingerprint() != full.fingerprint()


# -- malformed input: one line, naming the archive and the member ------------------------------

def _two(**over):
    images = _images(3, idx=[0, 1], h=4, w=4)
    images.update(over)
    return images


def _zip(d, members, meta=None, **kw):
    write_edm(d / "d.zip", members, meta, **kw)
    return dict(format="edm", path="d.zip")


def _mixed_sizes(d):
    return (_zip(d, _two(**{_name(1): np.zeros((4, 5, 3), np.uint8)})), _name(1),
            "is 5x4 RGB but 00000/img00000000.png is 4x4 RGB")


def _mixed_channels(d):
    return (_zip(d, _two(**{_name(1): np.zeros((4, 4), np.uint8)})), _name(1),
            "is 4x4 greyscale but .* is 4x4 RGB")


def _zip_bomb(d):
    # 4 MiB of zeros deflate to about 4 KiB: far beyond the 200:1 an image may expand by
    images = _two(**{_name(1): bytes(4 << 20)})
    return _zip(d, images, compression=zipfile.ZIP_DEFLATED), _name(1), "zip bomb"


def _huge_claimed_size(d):
    _zip(d, _two())
    raw = bytearray((d / "d.zip").read_bytes())
    at = [m.start() for m in re.finditer(rb"PK\x01\x02", raw)]
    names = [bytes(raw[a + 46:a + 46 + int.from_bytes(raw[a + 28:a + 30], "little")])
             for a in at]
    a = at[names.index(_name(0).encode())]
    raw[a + 24:a + 28] = (1 << 30).to_bytes(4, "little")       # uncompressed size: 1 GiB
    (d / "d.zip").write_bytes(bytes(raw))
    return dict(format="edm", path="d.zip"), _name(0), "claims 1073741824 bytes"


def _bad_crc(d):
    _zip(d, _two())
    raw = bytearray((d / "d.zip").read_bytes())
    at = raw.index(b"IDAT", raw.index(_name(1).encode())) + 8       # inside image 1's pixels
    raw[at] ^= 0xFF
    (d / "d.zip").write_bytes(bytes(raw))
    return dict(format="edm", path="d.zip"), _name(1), "unreadable image in the archive.*CRC"


def _bzip2_member(d):
    return (_zip(d, _two(), compression=zipfile.ZIP_BZIP2), _name(0),
            "compressed with bzip2; only stored or deflated")


def _decompression_bomb_png(d):
    raw = bytearray(_png(np.zeros((4, 4), np.uint8)))
    raw[16:24] = (10000).to_bytes(4, "big") * 2                   # IHDR: 10000 x 10000
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    return (_zip(d, {_name(0): bytes(raw), _name(1): np.zeros((4, 4), np.uint8)}), _name(0),
            "claims 10000x10000 pixels")


def _corrupt_png(d):
    return (_zip(d, _two(**{_name(1): b"\x89PNG\r\n\x1a\n garbage"})), _name(1),
            "unreadable image")


def _duplicate_member(d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)         # zipfile: "Duplicate name"
        with zipfile.ZipFile(d / "d.zip", "w") as z:
            for _ in range(2):
                z.writestr(_name(0), _png(np.zeros((4, 4), np.uint8)))
    return dict(format="edm", path="d.zip"), _name(0), "holds this member twice"


def _not_json(d):
    return _zip(d, _two(), b"{labels: oops"), "dataset.json", "not valid JSON"


def _json_not_object(d):
    return _zip(d, _two(), [[_name(0), 1]]), "dataset.json", r'expected \{"labels"'


def _json_no_labels_key(d):
    return _zip(d, _two(), {"classes": 2}), "dataset.json", r'expected \{"labels"'


def _labels_not_list(d):
    return _zip(d, _two(), {"labels": {_name(0): 1}}), "dataset.json", "must be a list of"


def _entry_not_pair(d):
    return (_zip(d, _two(), {"labels": [[_name(0), 1], [_name(1)]]}), "dataset.json",
            r"labels\[1\] must be")


def _label_names_missing_file(d):
    meta = {"labels": [[_name(0), 1], [_name(1), 0], ["00000/img00000099.png", 2]]}
    return (_zip(d, _two(), meta), "dataset.json",
            "names 00000/img00000099.png, an image the archive does not hold")


def _non_integer_label(d, bad=1.5):
    return (_zip(d, _two(), {"labels": [[_name(0), 1], [_name(1), bad]]}), "dataset.json",
            f"the label of {_name(1)} must be an integer >= 0")


def _negative_label(d):
    return _non_integer_label(d, -1)


def _string_label(d):
    return _non_integer_label(d, "6")


def _bool_label(d):
    return _non_integer_label(d, True)


def _list_label(d):
    return _non_integer_label(d, [1, 0])


def _image_without_label(d):
    return (_zip(d, _two(), {"labels": [[_name(0), 1]]}), "dataset.json",
            f"gives no label for {_name(1)}")


def _some_labels_null(d):
    return (_zip(d, _two(), {"labels": [[_name(0), 1], [_name(1), None]]}), "dataset.json",
            "is null but other images have labels")


def _no_images(d):
    return _zip(d, {"notes.txt": b"x"}, {"labels": None}), "d.zip", "no PNG or JPEG images"


def _not_a_zip(d):
    (d / "d.zip").write_bytes(b"PK\x03\x04 but not really a zip")
    return dict(format="edm", path="d.zip"), "d.zip", "not a readable zip archive"


def _missing_archive(d):
    return dict(format="edm", path="d.zip"), "d.zip", "not found"


def _folder_bad_json(d):
    write_edm(d / "f", _two(), b"[")
    return dict(format="edm", path="f"), "f/dataset.json", "not valid JSON"


def _folder_mixed_sizes(d):
    write_edm(d / "f", _two(**{_name(1): np.zeros((3, 4, 3), np.uint8)}))
    return dict(format="edm", path="f"), f"f/{_name(1)}", "is 4x3 RGB but"


MALFORMED = [_mixed_sizes, _mixed_channels, _zip_bomb, _huge_claimed_size, _bad_crc,
             _bzip2_member, _decompression_bomb_png, _corrupt_png, _duplicate_member, _not_json,
             _json_not_object, _json_no_labels_key, _labels_not_list, _entry_not_pair,
             _label_names_missing_file, _non_integer_label, _negative_label, _string_label,
             _bool_label, _list_label, _image_without_label, _some_labels_null, _no_images,
             _not_a_zip, _missing_archive, _folder_bad_json, _folder_mixed_sizes]


@pytest.mark.parametrize("make", MALFORMED, ids=lambda f: f.__name__.strip("_"))
def test_malformed_input_is_one_line_naming_archive_and_member(tmp_path, make):
    data, member, why = make(tmp_path)
    with pytest.raises(UserError) as err:
        _load(tmp_path, **data)
    msg = str(err.value)
    assert "\n" not in msg and member in msg, msg
    if data["path"] == "d.zip":
        assert f"d.zip:{member}" in msg or member == "d.zip", msg
    assert re.search(why, msg), msg


def test_conditional_false_skips_dataset_json(tmp_path):
    """Like idx without its labels file: an unconditional dataset does not read the labels."""
    _zip(tmp_path, _two(), b"not json")
    assert _load(tmp_path, format="edm", path="d.zip", conditional=False).y is None


# -- through the CLI --------------------------------------------------------------------------

CLI_CONFIG = """
[run]
out_dir = "out"
stages = ["teacher"]
[data]
format = "edm"
path = "ds.zip"
hflip = true
[network]
name = "unet"
model_channels = 8
channel_mult = [1, 2]
num_blocks = 1
attn_resolutions = [4]
[teacher]
kind = "network"
[teacher_train]
iterations = 2
batch_size = 4
checkpoint_every = 2
"""


def test_cli_accepts_an_edm_config(tmp_path, write_config, run_main):
    from core.host.config import load_config
    from core.data.source import DataSource

    images = _images(3, idx=range(8), h=8, w=8, seed=4)
    write_edm(tmp_path / "ds.zip", images, _meta(images, [i % 2 for i in range(8)]))
    cfg = write_config(CLI_CONFIG)
    src = DataSource(load_config(cfg).data)
    assert src.shape == (3, 8, 8) and src.dataset.hflip and src.y.tolist() == [0, 1] * 4
    assert np.array_equal(src.x.numpy(), _want(images))
    rc, _, err = run_main(cfg)
    assert rc == 0, err
    assert (tmp_path / "out" / "teacher.pt").is_file()
    # a broken archive stops the run before anything is written, in one line naming it
    (tmp_path / "bad.zip").write_bytes(b"nope")
    rc, _, err = run_main(cfg, "--set", 'data.path="bad.zip"', "--set", 'run.out_dir="out2"')
    assert rc == 2 and err.count("\n") == 1 and "bad.zip: not a readable zip archive" in err
    assert not (tmp_path / "out2").exists()
