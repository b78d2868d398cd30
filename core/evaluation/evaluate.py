"""Metrics for jumpers on teachers with a reference ODE solution.

* trajectory error: the jumper's K-step deterministic CTM sampling (Appendix B.3) against the
  teacher's high-accuracy PF-ODE solution from the same noise, at every intermediate time;
* distribution distance: exact Wasserstein-1 in 1-D, sliced Wasserstein-1 otherwise.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from core.export.sampling import CTMSampler
from core.diffusion.schedules import rho_grid


def w1_1d(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W1 between two 1-D empirical distributions: the integral of |F_a - F_b|."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    xs = np.sort(np.concatenate([a, b]))
    Fa = np.searchsorted(a, xs[:-1], side="right") / len(a)
    Fb = np.searchsorted(b, xs[:-1], side="right") / len(b)
    return float(np.sum(np.abs(Fa - Fb) * np.diff(xs)))


def sliced_w1(a: np.ndarray, b: np.ndarray, projections: int = 256, seed: int = 0) -> float:
    """Mean over random unit directions of the exact 1-D W1 of the projections."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((projections, a.shape[1]))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return float(np.mean([w1_1d(a @ d, b @ d) for d in dirs]))


def distribution_distance(a: np.ndarray, b: np.ndarray, projections: int = 256,
                          seed: int = 0) -> tuple[str, float]:
    if a.reshape(len(a), -1).shape[1] == 1:
        return "w1", w1_1d(a.ravel(), b.ravel())
    return "sliced_w1", sliced_w1(a, b, projections, seed)


def with_schedules(steps: list[int], schedules: Optional[dict]) -> list[int]:
    """`steps` followed by the step counts that only an explicit schedule names (ascending)."""
    return list(steps) + sorted(K for K in (schedules or {}) if K not in steps)


@torch.no_grad()
def trajectory_errors(jumper, teacher, steps: list[int], num: int, seed: int, t_min: float,
                      t_max: float, rho: float, dtype=torch.float32,
                      class_labels: Optional[torch.Tensor] = None,
                      reference_cache: Optional[dict] = None, device: str = "cpu",
                      schedules: Optional[dict] = None) -> dict:
    """{K: {"final_rmse", "path_rmse"}}: RMS per dimension of the jumper's states minus the
    teacher ODE's, at t_min (final) and over all K landing times (path). Pass the same
    `reference_cache` dict to compare several jumpers without re-solving the teacher ODE
    (it is keyed by the landing times, the noise count and the seed).
    The jumper runs on `device`; the teacher's reference solution is computed on the CPU.
    A class-conditional teacher without `class_labels` gets uniformly random labels.

    `schedules` ({K: [t_max, ..., t_min]}) gives explicit times for some K instead of the rho
    grid; their entries also hold ``"schedule"``: the times. A K of `schedules` that is not in
    `steps` is evaluated too (after `steps`)."""
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn((num, *teacher.shape), generator=gen, dtype=torch.float64) * t_max
    if class_labels is None and teacher.num_classes > 0:      # a conditional teacher: random
        class_labels = torch.randint(0, teacher.num_classes, (num,), generator=gen)
    d = teacher.dim
    schedules = schedules or {}
    out = {}
    for K in with_schedules(steps, schedules):
        explicit = K in schedules
        ts = [float(t) for t in schedules[K]] if explicit else rho_grid(K, t_min, t_max, rho)
        if explicit and (len(ts) != K + 1 or not math.isclose(ts[0], t_max, rel_tol=1e-6)
                         or not math.isclose(ts[-1], t_min, rel_tol=1e-6)):
            raise ValueError(f"schedule for {K} steps must hold {K + 1} times from t_max "
                             f"{t_max:g} to t_min {t_min:g}, got {ts}")
        traj: list = []
        labels = class_labels.to(device) if class_labels is not None else None
        CTMSampler(0.0).sample(jumper, x_T.to(device=device, dtype=dtype), ts, gen, labels,
                               trajectory=traj)
        traj = [a.cpu() for a in traj]
        cache = reference_cache if reference_cache is not None else {}
        key = (num, seed, tuple(ts))         # x_T starts at ts[0]; the solution lands at ts[1:]
        if key not in cache:
            cache[key] = teacher.reference_solve(x_T, t_max, ts[1:], class_labels)
        ref = cache[key]
        sq = [((a.double() - r) ** 2).reshape(num, -1).sum(1) / d for a, r in zip(traj, ref)]
        out[K] = {"final_rmse": math.sqrt(float(sq[-1].mean())),
                  "path_rmse": math.sqrt(float(torch.stack(sq).mean()))}
        if explicit:
            out[K]["schedule"] = ts
    return out
