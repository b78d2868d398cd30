"""Which config keys enter a fingerprint is declared with the key (`Key.result`, core.host.config),
and the fingerprints of existing configs are what they were before that declaration existed:
an existing run's checkpoints still resume, its coefficient store is still reused.

tests/fixtures/fingerprints.json holds the fingerprints of the example configs (each also with
the overrides in `OVERRIDES`) as the code before `Key.result` computed them (commit facc7b5:
core.train.distill.fingerprint; the teacher's fingerprint and the store's settings were written
inline in core/train/teacher.py and core/pipeline/stages.py, evaluated here as they were written),
with "teacher-fp" / "data-fp" as the teacher's and the data's content fingerprints. Configs
added since (fashion_mnist_study_long, recipe_smoke, paper/cifar10_ctm_gan) are pinned as the
code computed them when they were added."""

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.host import config as C
from core.train.distill import fingerprint as distill_fingerprint
from core.pipeline.stages import coefficient_settings
from core.train.teacher import fingerprint as teacher_fingerprint
from core.train.loop import config_digest

ROOT = Path(__file__).resolve().parents[1]
PINNED = json.loads((ROOT / "tests" / "fixtures" / "fingerprints.json").read_text())
OVERRIDES = {"": [], "cosine": ["distill.lr_schedule=cosine", "teacher_train.lr_schedule=cosine"],
             "edm-smooth": ["coefficients.grid=edm", "coefficients.smooth=0.5"],
             "speed": ["distill.compile=true", "distill.micro_batch=4", "coefficients.compile=true",
                       "coefficients.times_per_call=3"]}


def _run(cfg):
    return SimpleNamespace(cfg=cfg, teacher=SimpleNamespace(fingerprint=lambda: "teacher-fp"),
                           data_fingerprint=lambda: "data-fp")


def fingerprints(cfg) -> dict:
    return {"distill": distill_fingerprint(_run(cfg), {"name": "precond-desc"}),
            "teacher": teacher_fingerprint(cfg, "data-fp"),
            "coefficients": config_digest(coefficient_settings(cfg, "data-fp"))}


def test_every_example_config_is_pinned():
    examples = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("examples/*.toml"),
                                                         *ROOT.glob("examples/paper/*.toml")])
    assert sorted({name.partition("+")[0] for name in PINNED}) == examples


@pytest.mark.parametrize("name", sorted(PINNED))
def test_fingerprints_of_existing_configs_are_unchanged(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    path, _, tag = name.partition("+")
    assert fingerprints(C.load_config(path, OVERRIDES[tag])) == PINNED[name]


SENTINEL = "changed"


def _changed(obj, field: str):
    return dataclasses.replace(obj, **{field: SENTINEL})


def _fields(cls):
    return [(f.name, f.metadata["key"]) for f in dataclasses.fields(cls) if "key" in f.metadata]


def test_a_key_enters_the_training_fingerprints_if_and_only_if_it_changes_a_result(tmp_path):
    # cosine: every schedule key bears on the weights, and so does iterations (the lr of each
    # iteration depends on it: core.train.loop.with_lr_schedule)
    # a GAN on: its keys bear on the weights only then (core.train.gan.fingerprint_keys)
    raw = {"teacher": {"kind": "gmm"}, "distill": {"lr_schedule": "cosine", "gan_weight": 0.5},
           "teacher_train": {"lr_schedule": "cosine"}}
    cfg = C.parse_config(raw, tmp_path / "config.toml")
    base = fingerprints(cfg)
    for section, what, cls in (("distill", "distill", C.DistillCfg),
                               ("teacher_train", "teacher", C.TeacherTrainCfg)):
        for name, k in _fields(cls):
            other = dataclasses.replace(cfg, **{section: _changed(getattr(cfg, section), name)})
            moved = fingerprints(other)[what] != base[what]
            assert moved == (k.result or name == "iterations"), (section, name, k.result)


def test_a_key_enters_the_store_settings_if_and_only_if_it_changes_a_result(tmp_path):
    cfg = C.parse_config({"teacher": {"kind": "gmm"}}, tmp_path / "config.toml")
    base = config_digest(coefficient_settings(cfg, "data-fp"))
    for name, k in _fields(C.CoefficientsCfg):
        other = dataclasses.replace(cfg, coefficients=_changed(cfg.coefficients, name))
        moved = config_digest(coefficient_settings(other, "data-fp")) != base
        assert moved == (k.result and name != "data"), (name, k.result)   # data: by content
