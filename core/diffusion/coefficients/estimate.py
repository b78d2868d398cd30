"""Monte-Carlo estimation of l_t and s_t from the teacher alone (paper Appendix B.1).

For every grid time t and every sample x_t = x_0 + t * eps ~ q(x_t):

* l_t = 1 - E[tr(dD/dx)] / d                                             (Eqn. 15)
  with Hutchinson's estimator tr(J) ~ v^T J v, v Rademacher, J v by one forward-mode JVP.
* s_t = E[g^T dg/dlambda] / E[||g||^2],  g = D - (1 - l_t) x              (Eqn. 17, Eqn. 11)
  dg/dlambda = dD/dlambda + (dl/dlambda) x - (1 - l_t)(D - x)            (Eqn. 27)
  where dD/dlambda is the derivative along the PF-ODE, i.e. the JVP of D(x, t) in the
  direction (dx/dlambda, dt/dlambda) = (D - x, -t).

dl/dlambda, two ways (``[coefficients] dl``):

* ``"jvp"`` (default): exact. With common random numbers l(t) = 1 - E[v^T J(x_0 + t eps, t) v]/d
  for fixed x_0, eps, v, so dl/dlambda = -E[v^T d(J v)/dlambda] / d, where d(J v)/dlambda is the
  JVP of (x, t) -> J(x, t) v in the direction (dx/dlambda, dt/dlambda) = (-t eps, -t): forward
  over forward mode, statistic "trdot". Every t is estimated on its own, so the numbers at a
  time do not depend on the grid around it. Cost: one forward-over-forward pass (primal D,
  tangents J v and dD/dlambda along the path, mixed tangent d(J v)/dlambda), then one
  first-order JVP for dD/dlambda along the PF-ODE: ~15-17 forward-equivalents per
  (t x sample) against ~6 for "fd" (tools/bench_coefficients.py, MLP teacher, CPU float64).
* ``"fd"``: 4th-order finite differences of the l-grid over lambda (numerics.derivative);
  cheaper (one forward, then J v and dD/dlambda as two vmapped tangents of one JVP), but the
  error of dl/dlambda is multiplied by E[g.x]/E||g||^2 in s_t, large at small t, so s_t
  depends on the grid (and need not converge on network teachers).

The same x_0, eps and v are used at every time step (common random numbers), which makes l_t
smooth in t. Random draws are keyed by batch index, so splitting batches across processes
gives identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.func import jvp, vmap
from tqdm.auto import tqdm

from core.diffusion.coefficients.numerics import derivative
from core.diffusion.coefficients.table import CoefficientTable
from core.base.errors import UserError, first_line

#: statistics kept per (time step, sample); all dot products are over the data dimensions.
#: "trdot" = v^T d(J v)/dlambda along x_t = x_0 + t eps, only with dl = "jvp" (the "fd" path
#: keeps the first N_FD columns)
STATS = ("tr", "DD", "Dx", "xx", "DDdot", "xDdot", "trdot")
N_FD = 6

#: ways to get dl/dlambda: exact nested forward-mode JVP, or finite differences over the grid
DL_MODES = ("jvp", "fd")

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


def _jvps_sequential(f: Callable, x, tt, v, fo: Callable):
    D, Jv = fo(x, tt, v, torch.zeros_like(tt))
    _, Ddot = fo(x, tt, D - x, -tt)
    return D, Jv, Ddot


def _first_order(denoise: Callable, labels, x, tt, dx, dt):
    """(D, the JVP of D(x, t) in the direction (dx, dt)): one forward-mode pass."""
    return jvp(lambda a, b: denoise(a, b, labels), (x, tt), (dx, dt))


def compiled_first_order():
    """`_first_order` through torch.compile (``[coefficients] compile``), static shapes: one
    compile per batch size (the last batch may be smaller). The nested forward-over-forward
    JVP of dl = "jvp" stays eager: dynamo cannot trace nested torch.func.jvp over a
    broadcasting product (torch 2.14: "more than one element of the written-to tensor refers
    to a single memory location" on fake tensors), so only its PF-ODE JVP is compiled."""
    from core.base.compiled import compile_static

    return compile_static(_first_order)


# dl = "jvp": J v differentiated once more, along (dx/dlambda, dt/dlambda) = (w_x, w_t) of the
# common-random-number path x_t = x_0 + t eps. One forward-over-forward pass carries D, J v,
# dD/dlambda along that path (unused) and d(J v)/dlambda; one more JVP gives dD/dlambda along
# the PF-ODE, whose direction needs D. No vmap: stacking the two first-order tangents under
# the outer JVP (one shared primal) measured slower on CPU (MLP 20.6 vs 17.7, GMM 56 vs 28
# forward-equivalents), so this path needs no batching rules at all.
# Grad mode is on around the nested transforms: under no_grad the inner JVP of some ops (silu,
# ...) calls a *_backward kernel without a forward-AD formula (torch 2.14: "Trying to use
# forward AD with aten::silu_backward that does not support it"), with grad mode on it is
# decomposed into differentiable ops. The inputs do not require grad, so autograd records
# nothing unless the teacher's own parameters require grad (ctmkit's teachers freeze theirs).

def _jvps_nested(f: Callable, x, tt, v, w_x, w_t, fo: Callable):
    inner = lambda x_, t_: jvp(lambda a: f(a, t_), (x_,), (v,))
    with torch.enable_grad():
        (D, Jv), (_, Jv_dot) = jvp(inner, (x, tt), (w_x, w_t))
    D, Jv, Jv_dot = D.detach(), Jv.detach(), Jv_dot.detach()     # drop any recorded graph
    _, Ddot = fo(x, tt, D - x, -tt)
    return D, Jv, Ddot, Jv_dot


def per_sample_stats(denoise: Callable, x0: torch.Tensor, eps: torch.Tensor, v: torch.Tensor,
                     t, labels: Optional[torch.Tensor], batched: bool = True,
                     dtype: torch.dtype = torch.float64, dl: str = "jvp",
                     first_order: Optional[Callable] = None) -> torch.Tensor:
    """[B, len(STATS)] statistics at time t for one batch (float64; [B, N_FD] with
    dl = "fd"); t: a float, or a float64 tensor [B] of per-row times (several time steps of
    one batch in one call). The teacher runs in `dtype`; x_t and the inner products stay
    float64 (||g||^2 at small t is a small difference of large products). `first_order`:
    a replacement for `_first_order` (the compiled one)."""
    if not torch.is_tensor(t):
        t = torch.full((x0.shape[0],), float(t), dtype=torch.float64, device=x0.device)
    t_col = t.reshape([-1] + [1] * (x0.dim() - 1))
    x = x0 + t_col * eps
    xn = x.to(dtype)
    tt = t.to(dtype)
    f = lambda x_, t_: denoise(x_, t_, labels)
    fo = lambda x_, t_, dx, dt: (first_order or _first_order)(denoise, labels, x_, t_, dx, dt)
    # D, J v (Hutchinson probe) and dD/dlambda = J (D - x) - t dD/dt (along the PF-ODE)
    if dl == "fd":
        if batched and first_order is None:
            D, Jv, Ddot = _jvps_batched(f, xn, tt, v.to(dtype))
        else:
            D, Jv, Ddot = _jvps_sequential(f, xn, tt, v.to(dtype), fo)
        Jv_dot = None
    elif dl == "jvp":
        # ... and d(J v)/dlambda along x_t = x_0 + t eps: (dx/dlambda, dt/dlambda) = (-t eps, -t)
        D, Jv, Ddot, Jv_dot = _jvps_nested(f, xn, tt, v.to(dtype), (-t_col * eps).to(dtype),
                                           -tt, fo)
    else:
        raise ValueError(f"dl must be one of {DL_MODES}, got {dl!r}")
    D, Jv, Ddot = D.double(), Jv.double(), Ddot.double()
    f = lambda a, b: (a * b).flatten(1).sum(1)
    cols = [f(v, Jv), f(D, D), f(D, x), f(x, x), f(D, Ddot), f(x, Ddot)]
    if Jv_dot is not None:
        cols.append(f(v, Jv_dot.double()))
    return torch.stack(cols, dim=1)


@torch.no_grad()
def collect(denoise: Callable, sample_x0: Callable, ts: np.ndarray, n_samples: int, batch: int,
            seed: int, device: str = "cpu", batches: Optional[list[int]] = None,
            progress: bool = True, dtype: torch.dtype = torch.float64,
            dl: str = "jvp", times_per_call: int = 1, compile: bool = False) -> np.ndarray:
    """Per-sample statistics, shape [n_t, n_samples, len(STATS)] ([..., N_FD] with dl = "fd";
    rows of other ranks' batches stay zero when `batches` restricts the work to a shard).

    `times_per_call`: each teacher call takes the batch at that many time steps at once
    (times_per_call x batch rows; the same draws, so the same numbers to float rounding).
    `compile`: the first-order JVPs through torch.compile (`compiled_first_order`).

    TorchScript's optimising executor is off meanwhile: from its second call on, a scripted
    module (a ``torchscript`` teacher) returns wrong forward-mode JVPs under it (seen with torch
    2.14: a scripted 2-layer MLP's JVP off by 0.25 from the second call; pytorch#73972)."""
    with torch.jit.optimized_execution(False):
        return _collect(denoise, sample_x0, ts, n_samples, batch, seed, device, batches,
                        progress, dtype, dl, max(1, int(times_per_call)),
                        compiled_first_order() if compile else None)


def _collect(denoise, sample_x0, ts, n_samples, batch, seed, device, batches, progress,
             dtype, dl, k, first_order) -> np.ndarray:
    if dl not in DL_MODES:
        raise ValueError(f"dl must be one of {DL_MODES}, got {dl!r}")
    n_batches = -(-n_samples // batch)
    batches = list(range(n_batches)) if batches is None else batches
    out = np.zeros((len(ts), n_samples, len(STATS) if dl == "jvp" else N_FD))
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
        for i in range(0, len(ts), k):
            chunk = [float(t) for t in ts[i:i + k]]          # time steps in this call
            m, n = len(chunk), hi - lo
            t_rows = torch.tensor(chunk, dtype=torch.float64).repeat_interleave(n).to(device)
            args = (_rows(x0, m), _rows(eps, m), _rows(v, m), t_rows,
                    _rows(labels, m) if labels is not None else None)
            try:
                rows = per_sample_stats(denoise, *args, batched, dtype, dl, first_order)
            except RuntimeError as e:
                if dl == "jvp":                      # this path uses no vmap: no fallback
                    _explain_nested_failure(e, denoise, x0, eps, v, chunk[0], labels, dtype)
                if not batched:
                    raise
                batched = False       # an op without a vmap batching rule: two plain JVPs
                rows = per_sample_stats(denoise, *args, batched, dtype, dl, first_order)
            out[i:i + m, lo:hi] = rows.cpu().numpy().reshape(m, n, -1)
            bar.update(m)
    bar.close()
    return out


def _rows(a: torch.Tensor, m: int) -> torch.Tensor:
    """`a` stacked m times along the batch dimension (times_per_call)."""
    return a.repeat(m, *([1] * (a.dim() - 1))) if m > 1 else a


def _explain_nested_failure(e: RuntimeError, denoise, x0, eps, v, t, labels, dtype):
    """The "jvp" path failed: a UserError pointing at dl = "fd" when first-order JVPs work
    (the teacher lacks forward-over-forward support, e.g. an op without a forward-AD formula
    for its derivative), else the original error."""
    try:
        per_sample_stats(denoise, x0, eps, v, t, labels, False, dtype, "fd")
    except RuntimeError:
        raise e from None
    first = first_line(e, None)
    raise UserError(f"coefficients: the teacher supports first-order JVPs but not the nested "
                    f"(forward-over-forward) JVP of the exact dl/dlambda ({first}); set "
                    f"[coefficients] dl = \"fd\" for finite differences over the time "
                    f"grid") from e


@dataclass
class Estimate:
    l: np.ndarray
    s: np.ndarray
    l_stderr: np.ndarray
    s_stderr: np.ndarray
    s_guarded: np.ndarray
    dl: np.ndarray            # dl/dlambda as used in s_t (exact JVP, or finite differences)


def finalize(ts: np.ndarray, stats: np.ndarray, dim: int) -> Estimate:
    """l_t, s_t and their standard errors from the per-sample statistics. dl/dlambda is the
    exact one when `stats` has the "trdot" column (dl = "jvp"), else finite differences over
    the grid `ts` (which then needs at least 5 points)."""
    n = stats.shape[1]
    tr, DD, Dx, xx, DDdot, xDdot = (stats[..., k] for k in range(N_FD))
    exact = stats.shape[-1] > N_FD
    l = 1.0 - tr.mean(1) / dim                                            # Eqn. (15)
    l_stderr = tr.std(1, ddof=1) / dim / np.sqrt(n)
    lam = -np.log(ts)
    if exact:
        dl_i = -stats[..., STATS.index("trdot")] / dim                    # per sample
        dl = dl_i.mean(1)
    else:
        dl = derivative(lam, l)                                           # dl/dlambda
    dl_est = dl
    c, dl = (1.0 - l)[:, None], dl[:, None]
    # g . dg/dlambda and ||g||^2 per sample, expanded with g = D - c x:
    num = (DDdot + dl * Dx - c * DD + c * Dx - c * xDdot - c * dl * xx + c * c * Dx    # Eqn. (27)
           - c * c * xx)
    den = DD - 2 * c * Dx + c * c * xx
    num_m, den_m = num.mean(1), den.mean(1)
    guarded = den_m <= GUARD_REL * (DD.mean(1) + xx.mean(1))
    safe = np.where(guarded, 1.0, den_m)
    s = num_m / safe                                                      # Eqn. (17)
    # delta-method standard error of a ratio of means
    if exact:
        # l_t and dl/dlambda are means over the same samples: their noise is correlated with
        # that of num and den (at small t it cancels: g ~ t^2 h(x_0) per sample, so s -> -2
        # with no sampling error), so take it in through the per-sample influence terms
        c_i = tr / dim                                    # 1 - l_t, per sample
        dnum_dc = (-DD + Dx - xDdot - dl * xx + 2 * c * Dx - 2 * c * xx).mean(1, keepdims=True)
        dnum_ddl = (Dx - c * xx).mean(1, keepdims=True)
        dden_dc = (-2 * Dx + 2 * c * xx).mean(1, keepdims=True)
        num = num + dnum_dc * (c_i - c) + dnum_ddl * (dl_i - dl)
        den = den + dden_dc * (c_i - c)
    var = (num.var(1, ddof=1) - 2 * s * _cov(num, den) + s * s * den.var(1, ddof=1)) / safe ** 2
    s_stderr = np.sqrt(np.maximum(var, 0.0) / n)
    if guarded.any():
        s, s_stderr = _fill_guarded(lam, s, s_stderr, guarded)
    return Estimate(l, s, l_stderr, s_stderr, guarded, dl_est)


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
                   progress: bool = True, dl: str = "jvp") -> CoefficientTable:
    stats = collect(denoise, sample_x0, ts, n_samples, batch, seed, device, progress=progress,
                    dl=dl)
    est = finalize(ts, stats, dim)
    return CoefficientTable(t=ts, l=est.l, s=est.s, l_stderr=est.l_stderr,
                            s_stderr=est.s_stderr, attrs=attrs, s_guarded=est.s_guarded)
