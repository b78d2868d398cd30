"""tools/relayout.py's rewrite rules (the lead runs the script on the merged tree): every form of
reference to a moved module is rewritten, whole dotted names only, and a second run changes
nothing. (This file is in the script's KEEP: its examples name the old modules.)"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import relayout as R  # noqa: E402

CASES = [
    ("from core import metrics, plugins\n",
     "from plugins.metrics import fid as metrics\nfrom core.host import plugins\n"),
    ("from core import REPO, plugins  # noqa\n",
     "from core import REPO  # noqa\nfrom core.host import plugins\n"),
    ("    from core import distributed as dist\n",
     "    from core.base import distributed as dist\n"),
    ("from core.data import DataSource\n", "from core.data.source import DataSource\n"),
    ("x = core.data.DataSource; core.datasets.load\n",
     "x = core.data.source.DataSource; core.data.datasets.load\n"),
    ("from core.training import (EMA,\n    backward)\n",
     "from core.train.loop import (EMA,\n    backward)\n"),
    ('monkeypatch.setattr("core.distill.to_device", f)\n',
     'monkeypatch.setattr("core.train.distill.to_device", f)\n'),
    ('Stage("teacher", "core.stages:teacher")\n',
     'Stage("teacher", "core.pipeline.stages:teacher")\n'),
    ("from plugins.teachers.base import Teacher\n", "from core.api import Teacher\n"),
    ("from plugins.edm import openai_unet\n", "from plugins.openai import unet as openai_unet\n"),
    ("see core/data.py, core/coefficients/store.py, core/metrics.py and plugins/metrics.py\n",
     "see core/data/source.py, core/diffusion/coefficients/store.py, plugins/metrics/fid.py and "
     "plugins/metrics/__init__.py\n"),
    ('"code/__torch__/core/jumper.py"\n', '"code/__torch__/core/export/jumper.py"\n'),
    # what stays: the commands, core.api, names that merely start like a moved one
    ("python -m core.run x.toml; core.api; core.runner; a.core.data; core.data_x\n", None),
]


@pytest.mark.parametrize("old,new", CASES)
def test_rewrite(old, new):
    out = R.rewrite(old)
    assert out == (old if new is None else new)
    assert R.rewrite(out) == out                      # idempotent


def test_every_move_has_a_room_and_no_new_name_is_an_old_one():
    assert not set(R.MOVES.values()) & set(R.MOVES)
    for new in R.MOVES.values():
        assert new.split(".")[0] in ("core", "plugins")
        assert R.rewrite(new) == new
