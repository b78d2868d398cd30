"""Sample quality of a jumper: draw samples with K jumps, save PNG grids, run the metric plugins
(FID, KID, ... of ``[evaluate] metrics``) against the reference dataset. Used by the `evaluate`
stage and by `distill`'s periodic evaluation (the paper's Fig. 3 curves)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.host import plugins

#: clean-fid's Inception modes -> the suffix of their extractor names and metric keys
INCEPTION_MODES = {"clean": "", "legacy_tensorflow": "_legacy_tf"}


class Info(dict):
    """The flavour of a metric's number: a plain dict (a JSON object in metrics.json) whose
    ``format(info, spec)`` is a one-line summary, so that log lines formatting every result
    value with ``:.4g`` print it instead of failing."""

    def __format__(self, spec: str) -> str:
        f, r = self.get("features") or {}, self.get("reference") or {}
        mode = f" {self['mode']}" if self.get("mode") else ""
        if r.get("source") == "npz":
            ref = f"{Path(str(r.get('path'))).name} (sha256 {str(r.get('sha256'))[:8]})"
        elif r.get("source") == "dataset":
            ref = f"data {str(r.get('fingerprint'))[:8]} ({r.get('num')} images)"
        else:
            ref = "?"
        return f"[{f.get('name', '?')}{mode} vs {ref}]"


def metric_objects(cfg, ctx, names=None) -> list:
    """The metric plugins named in [evaluate] metrics, built from [evaluate.metric]."""
    from core.host.config import Section

    out = []
    for name in (cfg.evaluate.metrics if names is None else names):
        options = Section("evaluate.metric", dict(cfg.evaluate.metric_options), str(cfg.path),
                          cfg.base_dir)
        out.append(plugins.build("metric", name, options, ctx, f"{cfg.path}: [evaluate] metrics"))
    return out


def compute_metrics(metrics: list, samples, reference, cache_dir: Path,
                    info: bool = True) -> dict:
    """{key: value} of every metric and, with `info`, ``"<key>_info"``: what the number is
    (a :class:`Info`: feature network, mode, reference), for metrics that
    describe themselves. Everything stays strict JSON."""
    out: dict = {}
    for m in metrics:
        values = m.compute(samples, reference, cache_dir)
        out.update(values)
        d = _info(m)
        if d is not None:
            out.update(paper_names(values, len(samples), d))
        if d is not None and info:
            out.update({f"{k}_info": d for k in values})
    return out


class Label(str):
    """A string among metric values: log lines format every value with ``:.4g``."""

    def __format__(self, spec: str) -> str:
        return str(self)


#: how many samples papers mean by "FID" (EDM, ADM, CTM: 50,000, "FID-50k")
PAPER_FID_NUM = 50_000


def paper_names(values: dict, num: int, info) -> dict:
    """The names papers use for an Inception FID of 50,000 samples: ``fid50k`` (clean-fid's
    clean mode) / ``fid50k_legacy_tf`` (the TensorFlow Inception, as EDM and ADM report it),
    each with ``<name>_reference``: which reference statistics (file name or dataset)."""
    out: dict = {}
    if num != PAPER_FID_NUM:
        return out
    ref = info.get("reference") or {}
    if ref.get("source") == "npz":
        name = Path(str(ref.get("path"))).name
    else:
        name = f"dataset {str(ref.get('fingerprint'))[:16]} ({ref.get('num')} images)"
    for suffix in INCEPTION_MODES.values():
        if "fid" + suffix in values:
            out[f"fid50k{suffix}"] = values["fid" + suffix]
            out[f"fid50k{suffix}_reference"] = Label(name)
    return out


def _info(metric):
    """The metric's description of its last result as an Info, or None."""
    describe = getattr(metric, "describe", None)
    d = describe() if callable(describe) else None
    if not isinstance(d, dict):
        return None
    return d if isinstance(d, Info) else Info(d)


@torch.no_grad()
def sample_quality(jumper, meta: dict, sampler, steps: list[int], num: int, batch: int,
                   seed: int, device: str, metrics: list, reference, cache_dir: Path,
                   grid_dir: Path | None = None, grid_name: str = "samples",
                   progress: bool = False, info: bool = False,
                   schedules: dict | None = None) -> dict:
    """{K: {metric: value}} for K-jump sampling of `num` images from the same seed; writes
    `<grid_dir>/<grid_name>_<K>step.png` (the first 64 samples) when grid_dir is given.

    With `info`, also ``"info": {metric: Info}`` -- what each number is (feature network,
    mode, reference), once for all K; the {K: ...} entries stay numbers only. The evaluate
    stage asks for it (metrics.json); distill's periodic evaluation does not (its values
    become metrics.csv columns and must all be numbers).

    `schedules` ({K: [t_max, ..., t_min]}) gives explicit times for some K instead of the
    sampler's grid; a K not in `steps` is evaluated too (after `steps`). With `info`, the
    times are reported as ``"schedules": {"K": [...]}`` beside "info"."""
    from core.evaluation.evaluate import with_schedules
    from core.evaluation.images import save_grid
    from core.export.sampling import draw

    schedules = schedules or {}
    out: dict = {}
    infos: dict = {}
    for K in with_schedules(steps, schedules):
        ts = ([float(t) for t in schedules[K]] if K in schedules
              else sampler.timesteps(K, meta["t_min"], meta["t_max"], meta["rho"]))
        x, labels = draw(jumper, meta, sampler, ts, num, batch, seed, device, progress=progress)
        if not np.all(np.isfinite(x)):
            out[K] = {m.name: float("nan") for m in metrics}
            continue
        if grid_dir is not None:
            save_grid(torch.from_numpy(x[:64]), grid_dir / f"{grid_name}_{K}step.png")
        out[K] = compute_metrics(metrics, torch.from_numpy(x), reference, cache_dir, info=False)
        for m in metrics if info else []:
            d = _info(m)
            if d is not None:
                infos[m.name] = d
    if infos:
        out["info"] = infos
    if info and schedules:
        out["schedules"] = {str(K): [float(t) for t in ts] for K, ts in schedules.items()}
    return out
