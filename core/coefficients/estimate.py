"""Monte-Carlo estimation of l_t and s_t from the teacher alone (paper Appendix B.1).

For every grid time t and every sample x_t = x_0 + t * eps ~ q(x_t):

* l_t = 1 - E[tr(dD/dx)] / d                                             (Eqn. 15)
  with Hutchinson's estimator tr(J) ~ v^T J v, v Rademacher, J v by one forward-mode JVP.
* s_t = E[g^T dg/dlambda] / E[||g||^2],  g = D - (1 - l_t) x              (Eqn. 17, Eqn. 11)
  dg/dlambda = dD/dlambda + (dl/dlambda) x - (1 - l_t)(D - x)            (Eqn. 27)
  where dD/dlambda is the derivative along the PF-ODE, i.e. the JVP of D(x, t) in the
  direction (dx/dlambda, dt/dlambda) = (D - x, -t), and dl/dlambda comes from the l-grid.

Cost per (time step x sample): one plain forward for D, then both JVPs (J v and dD/dlambda)
in one `vmap`-batched forward-mode pass that shares the primal computation (about 5 forward
equivalents for an MLP, tools/bench_coefficients.py); two separate JVPs as a fallback for
teachers whose ops have no batching rule.
The same x_0, eps and v are used at every time step (common random numbers), which makes l_t
smooth in t so that dl/dlambda can be taken by finite differences. Random draws are keyed by
batch index, so splitting batches across processes gives identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.func import jvp, vmap
from tqdm.auto import tqdm

from core.coefficients.numerics import derivative
from core.coefficients.table import CoefficientTable

#: statistics kept per (time step, sample); all dot products are over the data dimensions
STATS = ("tr", "DD", "Dx", "xx", "DDdot", "xDdot")

#: relative size of E||g||^2 below which s_t is treated as undefined (g ~ 0)
GUARD_REL = 1e-12


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator for batch `index`: independent of process count and batch order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2 ** 63 - 1))




def _jvps_batched(f: Callable, x, tt, v):
    D = f(x, tt)
    tan_x = torch.stack([v, D - x])                       # Hutchinson probe, ODE direction
    tan_t = torch.stack([torch.zeros_like(tt), -tt])      # dt/dlambda = -t
    _, out = vmap(lambda a, b: jvp(f, (x, tt), (a, b)))(tan_x, tan_t)
    return D, out[0], out[1]


def _jvps_sequential(f: Callable, x, tt, v):
    D, Jv = jvp(lambda x_: f(x_, tt), (x,), (v,))
    _, Ddot = jvp(f, (x, tt), (D - x, -tt))
    return D, Jv, Ddot


def per_sample_stats(denoise: Callable, x0: torch.Tensor, eps: torch.Tensor, v: torch.Tensor,
                     t: float, labels: Optional[torch.Tensor], batched: bool = True,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[B, len(STATS)] statistics at one time t for one batch (float64). The teacher runs in
    `dtype`; x_t and the inner products stay float64 (||g||^2 at small t is a small difference
    of large products)."""
    x = x0 + t * eps
    xn = x.to(dtype)
    tt = torch.full((x.shape[0],), t, dtype=dtype, device=x.device)
    f = lambda x_, t_: denoise(x_, t_, labels)
    # D, J v (Hutchinson probe) and dD/dlambda = J (D - x) - t dD/dt (along the PF-ODE)
    D, Jv, Ddot = (_jvps_batched if batched else _jvps_sequential)(f, xn, tt, v.to(dtype))
    D, Jv, Ddot = D.double(), Jv.double(), Ddot.double()
    f = lambda a, b: (a * b).flatten(1).sum(1)
    return torch.stack([f(v, Jv), f(D, D), f(D, x), f(x, x), f(D, Ddot), f(x, Ddot)], dim=1)


@torch.no_grad()
def collect(denoise: Callable, sample_x0: Callable, ts: np.ndarray, n_samples: int, batch: int,
            seed: int, device: str = "cpu", batches: Optional[list[int]] = None,
            progress: bool = True, dtype: torch.dtype = torch.float64) -> np.ndarray:
    """Per-sample statistics, shape [n_t, n_samples, len(STATS)] (rows of other ranks' batches
    stay zero when `batches` restricts the work to a shard).

    TorchScript's optimising executor is off meanwhile: from its second call on, a scripted
    module (a ``torchscript`` teacher) returns wrong forward-mode JVPs under it (seen with torch
    2.14: a scripted 2-layer MLP's JVP off by 0.25 from the second call; pytorch#73972)."""
    with torch.jit.optimized_execution(False):
        return _collect(denoise, sample_x0, ts, n_samples, batch, seed, device, batches,
                        progress, dtype)


def _collect(denoise, sample_x0, ts, n_samples, batch, seed, device, batches, progress,
             dtype) -> np.ndarray:
    n_batches = -(-n_samples // batch)
    batches = list(range(n_batches)) if batches is None else batches
    out = np.zeros((len(ts), n_samples, len(STATS)))
    batched = True
    bar = tqdm(total=len(batches) * len(ts), desc="coefficients", unit="t-batch",
               disable=not progress, leave=False)
    for b in batches:
        lo, hi = b * batch, min(n_samples, (b + 1) * batch)
        gen = batch_generator(seed, b)
        x0, labels = sample_x0(hi - lo, gen)
        x0 = x0.to(device=device, dtype=torch.float64)     # float64 draws for every dtype
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(device)
        v = (torch.randint(0, 2, x0.shape, generator=gen) * 2 - 1).to(device, torch.float64)
        if labels is not None:
            labels = labels.to(device)
        for i, t in enumerate(ts):
            try:
                row = per_sample_stats(denoise, x0, eps, v, float(t), labels, batched, dtype)
            except RuntimeError:
                if not batched:
                    raise
                batched = False       # an op without a vmap batching rule: two plain JVPs
                row = per_sample_stats(denoise, x0, eps, v, float(t), labels, batched, dtype)
            out[i, lo:hi] = row.cpu().numpy()
            bar.update(1)
    bar.close()
    return out


@dataclass
class Estimate:
    l: np.ndarray
    s: np.ndarray
    l_stderr: np.ndarray
    s_stderr: np.ndarray
    s_guarded: np.ndarray


def finalize(ts: np.ndarray, stats: np.ndarray, dim: int) -> Estimate:
    """l_t, s_t and their standard errors from the per-sample statistics."""
    n = stats.shape[1]
    tr, DD, Dx, xx, DDdot, xDdot = (stats[..., k] for k in range(len(STATS)))
    l = 1.0 - tr.mean(1) / dim                                            # Eqn. (15)
    l_stderr = tr.std(1, ddof=1) / dim / np.sqrt(n)
    lam = -np.log(ts)
    dl = derivative(lam, l)                                               # dl/dlambda
    c, dl = (1.0 - l)[:, None], dl[:, None]
    # g . dg/dlambda and ||g||^2 per sample, expanded from Eqn. (27) with g = D - c x:
    num = DDdot + dl * Dx - c * DD + c * Dx - c * xDdot - c * dl * xx + c * c * Dx - c * c * xx
    den = DD - 2 * c * Dx + c * c * xx
    num_m, den_m = num.mean(1), den.mean(1)
    guarded = den_m <= GUARD_REL * (DD.mean(1) + xx.mean(1))
    safe = np.where(guarded, 1.0, den_m)
    s = num_m / safe                                                      # Eqn. (17)
    # delta-method standard error of a ratio of means
    var = (num.var(1, ddof=1) - 2 * s * _cov(num, den) + s * s * den.var(1, ddof=1)) / safe ** 2
    s_stderr = np.sqrt(np.maximum(var, 0.0) / n)
    if guarded.any():
        s, s_stderr = _fill_guarded(lam, s, s_stderr, guarded)
    return Estimate(l, s, l_stderr, s_stderr, guarded)


def _cov(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    am, bm = a.mean(1, keepdims=True), b.mean(1, keepdims=True)
    return ((a - am) * (b - bm)).sum(1) / (a.shape[1] - 1)


def _fill_guarded(lam, s, s_stderr, guarded):
    """Where g ~ 0 any s_t gives the same jump; take s from the nearest defined neighbours
    (linear in lambda), or CTM's s = -1 when no time step defines it."""
    s, s_stderr = s.copy(), s_stderr.copy()
    ok = ~guarded
    if ok.any():
        s[guarded] = np.interp(lam[guarded], lam[ok], s[ok])
    else:
        s[:] = -1.0
    s_stderr[guarded] = np.nan
    return s, s_stderr


def estimate_table(denoise: Callable, sample_x0: Callable, dim: int, ts: np.ndarray,
                   n_samples: int, batch: int, seed: int, attrs: dict, device: str = "cpu",
                   progress: bool = True) -> CoefficientTable:
    stats = collect(denoise, sample_x0, ts, n_samples, batch, seed, device, progress=progress)
    est = finalize(ts, stats, dim)
    return CoefficientTable(t=ts, l=est.l, s=est.s, l_stderr=est.l_stderr,
                            s_stderr=est.s_stderr, attrs=attrs, s_guarded=est.s_guarded)
