"""Which stages are up to date: ``out_dir/stages.json``.

For every completed stage it records a *key* — a digest of the config sections the stage reads,
the content fingerprints of the teacher and data and the bytes of the files it reads — and the
SHA-256 of every file the stage wrote. A rerun of the same command skips a stage whose key is
unchanged and whose outputs are all still there, byte for byte ("up to date"); anything else
runs it again. A run killed in the middle of a stage leaves that stage's old record, which no
longer matches the outputs it rewrote (or, if it rewrote none, still vouches for the complete
outputs of the earlier run). Files inside out_dir are recorded by their relative names, so a
copied or moved out_dir keeps its records.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from core import __version__
from core.base.bounds import MAX_JSON_BYTES, load_json
from core.base.errors import UserError
from core.base.integrity import sidecar_path
from core.base.io import file_digest, save_json
from core.host.stage_table import BY_NAME, input_path

LEDGER = "stages.json"

#: tables recorded only when the config has them (keys of runs from before they existed hold)
_RECORDED_IF_PRESENT = ("discriminator",)
#: files of out_dir that are the run's own bookkeeping, never a stage's output
_BOOKKEEPING = (LEDGER, "run.json", ".lock")


def stage_key(run, stage: str) -> str:
    """The digest of what `stage` reads: its config tables and its other inputs, as its
    declaration (core.host.stage_table) names them."""
    cfg, st = run.cfg, BY_NAME[stage]
    desc = {"stage": stage, "ctmkit": __version__, "base_dir": str(cfg.base_dir),
            "run": {k: v for k, v in cfg.raw.get("run", {}).items()
                    if k not in ("stages", "preconds")},
            "config": {s: cfg.raw.get(s) for s in st.sections
                       if s in cfg.raw or s not in _RECORDED_IF_PRESENT}}
    inputs = {}
    for name in st.inputs:
        if name == "teacher":
            inputs[name] = run.teacher.fingerprint()
        elif name == "data":
            src = run.data_source()
            inputs[name] = src.fingerprint() if src is not None else None
        else:
            p = input_path(run, name)
            inputs[name] = file_digest(p) if p is not None and p.is_file() else None
    desc["inputs"] = inputs
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def watched_files(run) -> dict[Path, tuple]:
    """(mtime_ns, size) of the files a stage may write: out_dir's own files and the configured
    output paths that may lie elsewhere (checkpoint folders and caches are not outputs)."""
    cfg = run.cfg
    paths = [p for p in run.out_dir.iterdir() if p.is_file() and p.name not in _BOOKKEEPING
             and not p.name.startswith(".")] if run.out_dir.is_dir() else []
    paths += [cfg.coefficients.path, cfg.coefficients.path.with_suffix(".png"),
              cfg.export.path, cfg.export.path.with_suffix(".pt2"),
              sidecar_path(cfg.export.path.with_suffix(".pt2"))]
    if run.out_dir.is_dir():                  # [sample] formats = ["png"]: samples/*/*.png
        from core.export.sample_files import png_files
        paths += png_files(run.out_dir / "samples")
    out = {}
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        out[p] = (st.st_mtime_ns, st.st_size)
    return out


class Ledger:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LEDGER
        self.records = self._read()

    def _read(self) -> dict:
        try:                                    # missing, unreadable, foreign, too large or
            if self.path.stat().st_size > MAX_JSON_BYTES:       # too deep: trust nothing
                return {}
            data = load_json(self.path.read_bytes(), str(self.path), LEDGER)
        except (OSError, UserError):
            return {}
        return data if isinstance(data, dict) else {}

    def up_to_date(self, stage: str, key: str) -> bool:
        rec = self.records.get(stage)
        if not isinstance(rec, dict) or rec.get("key") != key:
            return False
        outputs = rec.get("outputs")
        if not isinstance(outputs, dict) or not outputs:
            return False
        for name, digest in outputs.items():
            p = self.path.parent / name              # absolute names stay absolute
            if not p.is_file() or file_digest(p) != digest:
                return False
        return True

    def _name(self, p: Path) -> str:
        try:
            return str(p.relative_to(self.path.parent))
        except ValueError:
            return str(p)

    def record(self, run, stage: str, key: str, before: dict, after: dict) -> None:
        """Record `stage` as completed with `key`; its outputs are its main file (which may
        have been reused rather than written) and the watched files it created or changed
        (`before` / `after`: `watched_files` snapshots)."""
        files = {p for p, st in after.items() if before.get(p) != st}
        main = main_output(run, stage)
        if main.is_file():
            files.add(main)
        self.records[stage] = {"key": key, "outputs": {self._name(p): file_digest(p)
                                                       for p in sorted(files)}}
        save_json(self.path, self.records)


def main_output(run, stage: str) -> Path:
    return BY_NAME[stage].main(run)
