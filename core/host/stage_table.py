"""The pipeline's stages, each declared once, in the order a run runs them.

A `Stage` says what the stage is called, which function runs it, which config tables and which
other inputs it reads, what it writes, and how a run schedules it. Everything that needs one
of these facts reads it here:

* `core.host.config` — the stage names ([run] stages: their choices and order);
* `core.run` — which function runs a stage, which stages every rank runs (`distributed`) and
  which a ``[run] preconds`` comparison runs once in the parent out_dir (`shared`);
* `core.pipeline.ledger` — a stage's key (its `sections` and `inputs`) and its main output;
* `core.pipeline.ownership` — the files a stage writes in out_dir (`files`);
* ``--dry-run`` (`core.pipeline.record`), through the ledger;
* the README's stage table (`table`, written by ``tools/stage_table.py --write``; checked by
  tests/test_stage_table.py), from `reads_doc` / `writes_doc`.

This module imports nothing heavy: `core.host.config` reads it while it is being imported, and a
stage's function is imported only when the stage runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Stage:
    name: str
    #: "module:function" that runs the stage: function(run) (`core.pipeline.stages.Run`)
    function: str
    #: the config tables it reads ([run] counts too, without its stages / preconds lists): they
    #: enter its ledger key
    sections: tuple[str, ...]
    #: what it reads besides the config, also in its key: "teacher" / "data" (their content
    #: fingerprints) and files, named by `output` of the stage that writes them or in
    #: `OTHER_INPUTS`
    inputs: tuple[str, ...]
    #: the name of its main output, and where it is (a function of the run)
    output: str
    main: Callable
    #: what it writes in out_dir besides its configured paths (folders end in "/"); a run that
    #: does not run the stage reads them (or leaves them alone)
    files: tuple[str, ...]
    #: every rank of a torchrun run runs it (splitting its work); else rank 0 alone
    distributed: bool
    #: a [run] preconds comparison runs it once, in the parent out_dir, for all its entries
    shared: bool
    #: the README table's "reads" and "writes" cells
    reads_doc: str
    writes_doc: str

    def run(self, run) -> None:
        module, _, name = self.function.partition(":")
        getattr(importlib.import_module(module), name)(run)


#: inputs that are no stage's output: name -> where it is (a function of the run; None: none)
OTHER_INPUTS = {"student.init": lambda run: run.warm_start_file()}
#: the inputs that are content fingerprints rather than files
FINGERPRINTS = ("teacher", "data")

STAGES: tuple[Stage, ...] = (
    Stage("teacher", "core.pipeline.stages:teacher",
          sections=("diffusion", "data", "network", "teacher", "teacher_train"),
          inputs=("data",),
          output="teacher.pt", main=lambda run: run.teacher_file(),
          files=("teacher_checkpoints/", "teacher_metrics.csv", "teacher_metrics_tb/",
                 "teacher_curves.png", "teacher_samples.png"),
          distributed=True, shared=True,
          reads_doc="`[data]`, `[network]`, `[teacher_train]`",
          writes_doc="`teacher.pt` (EMA weights; `[teacher] kind = \"network\"` loads it), "
                     "`teacher_metrics.csv`, `teacher_curves.png`, `teacher_samples.png` "
                     "(images)"),
    Stage("coefficients", "core.pipeline.stages:coefficients",
          sections=("diffusion", "data", "teacher", "coefficients"),
          inputs=("teacher", "data"),
          output="coefficients.h5", main=lambda run: run.cfg.coefficients.path,
          files=(),
          distributed=True, shared=True,
          reads_doc="teacher",
          writes_doc="`coefficients.h5` (+ `.png`); reused when teacher and settings match"),
    Stage("distill", "core.pipeline.stages:distill",
          sections=("diffusion", "data", "network", "teacher", "precond", "coefficients",
                    "student", "distill", "evaluate", "discriminator"),
          inputs=("teacher", "data", "coefficients.h5", "student.init"),
          output="student.pt", main=lambda run: run.out_dir / "student.pt",
          files=("student.pt", "checkpoints/", "metrics.csv", "metrics_tb/", "curves.png"),
          distributed=True, shared=False,
          reads_doc="teacher, precond (+ `coefficients.h5`), `[distill]`",
          writes_doc="`student.pt` (first EMA), `checkpoints/`, `metrics.csv`, `curves.png`"),
    Stage("export", "core.pipeline.stages:export",
          sections=("diffusion", "network", "teacher", "precond", "coefficients", "student",
                    "distill", "export"),
          inputs=("teacher", "student.pt", "coefficients.h5"),
          output="jumper.pt", main=lambda run: run.cfg.export.path,
          files=(),
          distributed=False, shared=False,
          reads_doc="teacher, `student.pt` if present, `coefficients.h5` (analytic)",
          writes_doc="`jumper.pt`: TorchScript + `meta.json`"),
    Stage("sample", "core.pipeline.stages:sample",
          sections=("export", "sample"),
          inputs=("jumper.pt",),
          output="samples.npy", main=lambda run: run.out_dir / "samples.npy",
          files=("samples.npy", "samples.labels.npy", "samples.png", ".samples.ctm_sample.npy",
                 ".samples.ctm_sample.labels.npy", ".samples.ctm_sample.png", "samples.npz",
                 "samples/"),
          distributed=False, shared=False,
          reads_doc="`jumper.pt`",
          writes_doc="`samples.npy` (float32 `[num, *shape]`), `samples.labels.npy` "
                     "(conditional), `samples.png`; Python or `ctm_sample` (`[sample] runner`)"),
    Stage("evaluate", "core.pipeline.stages:evaluate",
          sections=("diffusion", "data", "teacher", "export", "sample", "evaluate"),
          inputs=("teacher", "data", "jumper.pt", "samples.npy"),
          output="metrics.json", main=lambda run: run.out_dir / "metrics.json",
          files=("metrics.json",),
          distributed=False, shared=False,
          reads_doc="teacher, `jumper.pt`, `samples.npy`, `[data]` (metrics)",
          writes_doc="`metrics.json`, `samples_<K>step.png` (images)"),
)

#: the stage names, in their canonical order
NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    return BY_NAME[name]


def input_path(run, name: str) -> Path | None:
    """Where input file `name` of a stage is: the main output of the stage whose `output` it
    is, or an `OTHER_INPUTS` entry."""
    for s in STAGES:
        if s.output == name:
            return s.main(run)
    return OTHER_INPUTS[name](run)


def table() -> str:
    """The README's stage table (markdown)."""
    rows = ["| stage | reads | writes |", "| --- | --- | --- |"]
    rows += [f"| `{s.name}` | {s.reads_doc} | {s.writes_doc} |" for s in STAGES]
    return "\n".join(rows) + "\n"
