"""A stage is declared once (core.host.stage_table): the ledger, the runner, the ownership checks,
[run] stages and the README's table all read that declaration."""

import sys
from pathlib import Path
from types import SimpleNamespace

from core.host import config, stage_table
from core.pipeline import ledger, ownership
from core import run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import stage_table as tool  # noqa: E402


def test_every_copy_of_the_stage_table_is_generated_from_the_declarations():
    files = tool.copies()
    assert files, "no stage table (| stage | reads | writes |) in README.md or docs/"
    for f in files:
        assert tool.split(f.read_text(encoding="utf-8"))[1] == stage_table.table(), \
            f"{f}: the stage table is out of date: python tools/stage_table.py --write"


def test_the_table_names_every_stage_once_in_order():
    rows = stage_table.table().splitlines()[2:]
    assert [r.split("`")[1] for r in rows] == list(stage_table.NAMES)


def test_the_config_the_runner_and_ownership_read_the_declarations():
    assert config.STAGES == stage_table.NAMES
    assert run.SHARED_STAGES == tuple(s.name for s in stage_table.STAGES if s.shared)
    assert ownership.STAGE_FILES == {s.name: s.files for s in stage_table.STAGES}
    for s in stage_table.STAGES:
        module, _, name = s.function.partition(":")
        assert callable(getattr(__import__(module, fromlist=[name]), name)), s.function
        assert set(s.sections) <= set(config.KNOWN_SECTIONS), s.name


def test_every_input_is_a_fingerprint_a_stage_output_or_declared(tmp_path):
    outputs = {s.output: s for s in stage_table.STAGES}
    order = stage_table.NAMES
    for s in stage_table.STAGES:
        for name in s.inputs:
            assert name in stage_table.FINGERPRINTS or name in outputs or \
                name in stage_table.OTHER_INPUTS, (s.name, name)
            if name in outputs:           # written by an earlier stage
                assert order.index(outputs[name].name) < order.index(s.name), (s.name, name)
    cfg = config.parse_config({"teacher": {"kind": "gmm"}}, tmp_path / "config.toml")
    fake = SimpleNamespace(cfg=cfg, out_dir=cfg.run.out_dir, warm_start_file=lambda: None,
                           teacher_file=lambda: cfg.run.out_dir / "teacher.pt")
    assert stage_table.input_path(fake, "coefficients.h5") == cfg.coefficients.path
    assert stage_table.input_path(fake, "student.pt") == cfg.run.out_dir / "student.pt"
    assert stage_table.input_path(fake, "student.init") is None
    for s in stage_table.STAGES:
        assert ledger.main_output(fake, s.name) == s.main(fake)
        if s.output in {f.rstrip("/") for f in s.files}:      # its own out_dir file
            assert s.main(fake) == cfg.run.out_dir / s.output
