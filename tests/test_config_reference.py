"""Config keys are declared once (core.host.config): the docs' reference (docs/configuration.md),
the parser's defaults, its type errors and its unknown-key errors all follow from the
declarations."""

from pathlib import Path

import pytest

from core.host import config as C
from core import config_reference as ref
from core.base.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "configuration.md"

MINIMAL = {"teacher": {"kind": "gmm"}}


def readme_block() -> dict:
    text = ref.page_copy(PAGE.read_text(encoding="utf-8"))
    assert text.startswith("```toml\n") and text.endswith("```\n")
    return C.tomllib.loads(text[len("```toml\n"):-len("```\n")])


def test_readme_reference_is_generated_from_the_declarations():
    assert ref.page_copy(PAGE.read_text(encoding="utf-8")) == ref.render(), \
        "docs/configuration.md's config reference is out of date: " \
        "python tools/config_reference.py --write"


def test_the_readme_holds_no_second_copy():
    assert ref.BEGIN not in (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_reference_shows_every_declared_key_and_no_other():
    block = readme_block()
    declared = C.declared()
    assert set(block) == set(declared) and set(declared) == set(C.KNOWN_SECTIONS)
    for name, keys in declared.items():
        names = {k.name for k in keys}
        assert set(block[name]) == names, f"[{name}]: README {sorted(block[name])}"


def test_readme_reference_shows_the_defaults_in_effect():
    block = readme_block()
    for name, keys in C.declared().items():
        for k in keys:
            if k.example is None and not isinstance(k.default, C.Derived):
                assert block[name][k.name] == k.default, f"[{name}] {k.name}"
            # a key without a default value shows an example, so the block stays complete
            assert k.example is not None or (k.default is not None
                                             and k.default is not C._REQUIRED), k


def test_readme_reference_is_a_valid_config(tmp_path):
    cfg = C.parse_config(readme_block(), tmp_path / "config.toml")
    assert cfg.sample.num == 1000 and cfg.evaluate.seed == 1 and cfg.distill.lr == 4e-4


def test_parsed_defaults_are_the_declared_ones(tmp_path):
    cfg = C.parse_config(dict(MINIMAL, run={"seed": 7}), tmp_path / "config.toml")
    ctx = {"run": cfg.run}
    for name, cls in (("run", C.RunCfg), ("diffusion", C.DiffusionCfg),
                      ("coefficients", C.CoefficientsCfg), ("export", C.ExportCfg),
                      ("sample", C.SampleCfg), ("evaluate", C.EvaluateCfg),
                      ("teacher_train", C.TeacherTrainCfg), ("distill", C.DistillCfg)):
        obj = getattr(cfg, name)
        for f, k in zip([f for f in C.fields(cls) if "key" in f.metadata], C.keys(cls)):
            got = getattr(obj, f.name)
            if k.name == "seed" and name != "run":
                assert got == k.default.of(ctx) and got in (7, 8)
            elif k.kind == "path" and k.default is not None:
                base = cfg.run.out_dir if k.base else tmp_path
                assert got == (base / k.default).resolve(), (name, k.name)
            elif name == "run" and k.name == "seed":
                assert got == 7
            else:
                assert got == k.default, (name, k.name)
    assert cfg.student_init == "teacher"
    assert cfg.precond_name == "analytic" and cfg.network.data["name"] == "mlp"


def _wrong(k):
    """A value of the wrong type for key `k`."""
    return [1.5] if k.kind in ("str", "path", "strs") else "x"


@pytest.mark.parametrize("section,key", [(s, k) for s, ks in C.declared().items() for k in ks])
def test_every_declared_key_is_checked(tmp_path, section, key):
    raw = {s: dict(t) for s, t in MINIMAL.items()}
    raw.setdefault(section, {})[key.name] = _wrong(key)
    with pytest.raises(UserError) as e:
        C.parse_config(raw, tmp_path / "config.toml")
    msg = str(e.value)
    assert f"[{section}] {key.name}: " in msg and "\n" not in msg, msg


@pytest.mark.parametrize("section", ["run", "diffusion", "coefficients", "student", "export",
                                     "evaluate", "teacher_train"])
def test_undeclared_keys_are_errors(tmp_path, section):
    raw = {s: dict(t) for s, t in MINIMAL.items()}
    raw.setdefault(section, {})["bogus"] = 1
    with pytest.raises(UserError, match=rf"\[{section}\] unknown key 'bogus'"):
        C.parse_config(raw, tmp_path / "config.toml")


def test_ranges_and_choices_come_from_the_declarations(tmp_path):
    for section, k in [(s, k) for s, ks in C.declared().items() for k in ks]:
        raw = {s: dict(t) for s, t in MINIMAL.items()}
        if k.kind == "int" and k.max is not None:
            raw.setdefault(section, {})[k.name] = k.max + 1
            match = "must be <="
        elif k.kind == "str" and k.choices:
            raw.setdefault(section, {})[k.name] = "no-such-choice"
            match = "must be one of " + ", ".join(k.choices)
        else:
            continue
        with pytest.raises(UserError, match=rf"\[{section}\] {k.name}: {match}"):
            C.parse_config(raw, tmp_path / "config.toml")
