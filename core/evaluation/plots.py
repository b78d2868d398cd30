"""PNG figures: coefficient tables, preconditioning curves (paper Fig. 2c, Fig. 4), samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.base.io import atomic_path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def plot_coefficient_table(table, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    lt = np.log(table.t)
    for a, name, y, se in ((ax[0], "l_t", table.l, table.l_stderr),
                           (ax[1], "s_t", table.s, table.s_stderr)):
        a.plot(lt, y, lw=1.5)
        se = np.nan_to_num(se)
        a.fill_between(lt, y - 2 * se, y + 2 * se, alpha=0.3, label="±2 s.e.")
        a.set_title(name)
        a.set_xlabel("log t")
        a.legend()
    ax[2].plot(lt, np.log(table.L), label="log L_t")
    ax[2].plot(lt, np.log(table.S), label="log S_t")
    ax[2].plot(lt[1:], np.log(table.eta[1:]), label="log eta_t (eta = 0 at t_max)")
    ax[2].set_xlabel("log t")
    ax[2].legend()
    fig.suptitle("Analytic-Precond coefficients")
    _save(fig, path)


def plot_preconditionings(preconds: dict, t_min: float, t_max: float, path: Path) -> None:
    """f(t, eps) and g(t, eps) against log t (Fig. 2c) and g(t, s) heat maps (Fig. 4)."""
    import torch

    plt = _plt()
    t = torch.exp(torch.linspace(np.log(t_max), np.log(t_min), 400, dtype=torch.float64))
    eps = torch.full_like(t, t_min)
    n = len(preconds)
    fig = plt.figure(figsize=(max(12, 3.2 * n), 7.5))
    gs = fig.add_gridspec(2, max(n, 2))
    axf, axg = fig.add_subplot(gs[0, : max(n, 2) // 2]), fig.add_subplot(gs[0, max(n, 2) // 2:])
    for name, p in preconds.items():
        f, g = p(t, eps)              # numpy for matplotlib (a tensor's __array__ warns)
        axf.plot(t.log().numpy(), f.detach().numpy(), label=name)
        axg.plot(t.log().numpy(), g.detach().numpy(), label=name)
    axf.set_title("f(t, eps)")
    axg.set_title("g(t, eps)")
    for a in (axf, axg):
        a.set_xlabel("log t")
        a.legend(fontsize=8)
    grid = torch.exp(torch.linspace(np.log(t_min), np.log(t_max), 160, dtype=torch.float64))
    T, S = torch.meshgrid(grid, grid, indexing="ij")
    for i, (name, p) in enumerate(preconds.items()):
        _, g = p(T.reshape(-1), S.reshape(-1))
        g = g.reshape(T.shape).masked_fill(S > T, float("nan"))
        a = fig.add_subplot(gs[1, i])
        im = a.pcolormesh(grid.log().numpy(), grid.log().numpy(), g.T.detach().numpy(),
                          shading="auto", vmin=0, vmax=1)
        a.set_title(f"g(t, s): {name}", fontsize=9)
        a.set_xlabel("log t")
        a.set_ylabel("log s")
    fig.colorbar(im, ax=fig.axes[-1])
    _save(fig, path)


def plot_samples(x: np.ndarray, path: Path, title: str, reference: np.ndarray | None = None
                 ) -> None:
    """Histogram (1-D) or scatter of the first two coordinates, data in grey when given."""
    plt = _plt()
    flat = x.reshape(len(x), -1)
    ref = None if reference is None else reference.reshape(len(reference), -1)
    fig, ax = plt.subplots(figsize=(5, 4))
    if flat.shape[1] == 1:
        if ref is not None:
            ax.hist(ref[:, 0], bins=80, density=True, color="0.75", label="data")
        ax.hist(flat[:, 0], bins=80, density=True, histtype="step", lw=1.5, label="samples")
        ax.set_xlabel("x")
        ax.legend()
    else:
        if ref is not None:
            ax.scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.4, color="0.6", label="data")
        ax.scatter(flat[:, 0], flat[:, 1], s=2, alpha=0.5, label="samples")
        ax.legend(markerscale=4)
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]")
        ax.set_aspect("equal", "datalim")
    ax.set_title(title)
    _save(fig, path)


def plot_gap(results: dict, path: Path) -> None:
    """``ctmkit gap``'s figure: per preconditioning, the consistency gap (RMS) over the training
    grid's (t, s) pairs, on one log colour scale (drawn as Fig. 4 draws g(t, s)), and below, the
    gap per jump of each schedule against the jump's start time."""
    from matplotlib.colors import LogNorm

    plt = _plt()
    n = len(results)
    fig, ax = plt.subplots(2, n, figsize=(3.6 * n + 1, 6.8), squeeze=False)
    gaps = [p["gap_rms"] for r in results.values() for p in r["train_grid"]["pairs"]
            if p["gap_rms"] > 0]
    norm = LogNorm(vmin=min(gaps, default=1e-12), vmax=max(gaps, default=1.0))
    for i, (label, r) in enumerate(results.items()):
        pairs = r["train_grid"]["pairs"]
        ts = sorted({p["t"] for p in pairs} | {p["s"] for p in pairs})
        index = {t: j for j, t in enumerate(ts)}
        z = np.full((len(ts), len(ts)), np.nan)
        for p in pairs:
            z[index[p["s"]], index[p["t"]]] = max(p["gap_rms"], norm.vmin)
        a = ax[0, i]
        im = a.pcolormesh(np.log(ts), np.log(ts), z, shading="nearest", norm=norm)
        a.set_title(f"gap(t, s): {label}\ngrid RMS {r['train_grid']['gap_rms']:.3g}",
                    fontsize=9)
        a.set_xlabel("log t")
        a.set_ylabel("log s")
        b = ax[1, i]
        for K, jumps in r["schedules"].items():
            b.plot([np.log(j["t"]) for j in jumps], [j["gap_rms"] for j in jumps], "o-",
                   label=f"{K} steps")
        b.set_yscale("log")
        b.set_xlabel("log t (jump start)")
        b.set_ylabel("gap RMS")
        b.legend(fontsize=7)
    fig.colorbar(im, ax=list(ax[0]))
    _save(fig, path)


def plot_search_schedule(results: dict, path: Path) -> None:
    """``ctmkit search-schedule``'s figure: per preconditioning (rows) and step count
    (columns), the objective at every evaluated schedule against the middle time that was
    moved (for K >= 3 one colour per middle time, each drawn at the points of its own
    coordinate searches), the best schedule's times (stars) and the rho grid's (crosses)."""
    plt = _plt()
    Ks = sorted({int(K) for r in results.values() for K in r["schedules"]})
    fig, ax = plt.subplots(len(results), len(Ks), figsize=(4.4 * len(Ks), 3.4 * len(results)),
                           squeeze=False)
    for i, (label, r) in enumerate(results.items()):
        for j, K in enumerate(Ks):
            a = ax[i, j]
            e = r["schedules"].get(str(K))
            if e is None:
                a.set_visible(False)
                continue
            for k in range(1, K):
                pts = sorted((p["schedule"][k], p["value"]) for p in e["evaluated"]
                             if p.get("moved") == k)
                a.plot([t for t, _ in pts], [v for _, v in pts], ".", ms=5, alpha=0.8,
                       label=f"t_{k}" if K > 2 else "evaluated")
            best, rho = e["best"], e["rho_grid"]
            a.plot(best["schedule"][1:-1], [best["value"]] * (K - 1), "*", ms=13, color="k",
                   label=f"best {best['value']:.4g}")
            a.plot(rho["schedule"][1:-1], [rho["value"]] * (K - 1), "x", ms=9, color="r",
                   label=f"rho grid {rho['value']:.4g}")
            a.set_xscale("log")
            a.set_xlabel("middle time t" if K == 2 else "middle times t_k")
            a.set_ylabel(r["objective_shown"], fontsize=8)
            a.set_title(f"{label}: {K} steps ({r['jumper']})", fontsize=9)
            a.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
