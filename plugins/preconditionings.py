"""Preconditionings of the consistency function (paper Table 1).

Every preconditioning is a TorchScript-able module whose ``forward(t, s)`` returns the pair
``(f(t, s), g(t, s))``; the jumper then forms

    f_theta(x, t, s) = f(t, s) x + g(t, s) D_theta(x, t, s)    (CTM, Analytic-Precond; see Eqn. 8)
    f_theta(x, t, s) = f(t, s) x + g(t, s) F_theta(x, t, s)    (CM, BCM)

with D_theta = c_skip(t) x + c_out(t) F_theta (see Eqn. 3); ``jumps_denoiser`` says which, and
core.export.jumper.jump forms it. The contract is core.api.Preconditioning.
All satisfy the boundary condition f(t, t) = 1, g(t, t) = 0. Coefficients are computed in
float64 whatever the dtype of t and s.
"""


import math
from typing import Tuple

import torch
from torch import Tensor

from core.api import Preconditioning
from core.diffusion.coefficients.lookup import lookup
from core.host.hookspecs import hookimpl


class CMPrecond(Preconditioning):
    """Consistency models (Song et al. 2023), Table 1 / Eqn. 4 with epsilon -> s."""

    def __init__(self, sigma_data: float):
        super().__init__()
        self.name, self.variant, self.jumps_denoiser = "cm", "", False
        self.sigma_data = float(sigma_data)

    def forward(self, t: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        t, s, sd = t.double(), s.double(), self.sigma_data
        f = sd ** 2 / (sd ** 2 + (t - s) ** 2)
        g = sd * (t - s) / torch.sqrt(sd ** 2 + t ** 2)
        return f, g                                                       # Eqn. (4)


class BCMPrecond(Preconditioning):
    """Bidirectional consistency models (Li & He 2024), Table 1."""

    def __init__(self, sigma_data: float):
        super().__init__()
        self.name, self.variant, self.jumps_denoiser = "bcm", "", False
        self.sigma_data = float(sigma_data)

    def forward(self, t: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        t, s, sd = t.double(), s.double(), self.sigma_data
        f = (sd ** 2 + t * s) / (sd ** 2 + t ** 2)
        g = sd * (t - s) / torch.sqrt(sd ** 2 + t ** 2)
        return f, g


class CTMPrecond(Preconditioning):
    """Consistency trajectory models (Kim et al. 2023): the Euler step of Eqn. 9, i.e. Eqn. 6."""

    def __init__(self):
        super().__init__()
        self.name, self.variant, self.jumps_denoiser = "ctm", "", True

    def forward(self, t: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        t, s = t.double(), s.double()
        return s / t, 1.0 - s / t                                         # Eqn. (6)


class AnalyticPrecond(Preconditioning):
    """Analytic-Precond (Section 3): coefficients from the teacher's l_t, s_t tables.

    ``forward`` variant, Eqn. 14:
        f = (L_t S_t + (l_t - 1)(eta_s - eta_t)) / (L_s S_t),  g = (eta_s - eta_t) / (L_s S_t)
    ``backward`` variant, Table 1 (the one the paper trains with):
        f = L_t S_s / (L_s S_s + (1 - l_s)(eta_s - eta_t)),
        g = (eta_s - eta_t) / (L_s S_s + (1 - l_s)(eta_s - eta_t))

    The tables live on a uniform lambda grid (see core.diffusion.coefficients.table) and are interpolated
    at t and s by core.diffusion.coefficients.lookup; times outside [t_min, t_max] raise (unless the host
    has turned ``check_range`` off for grid times it checked once).
    """

    def __init__(self, lam0: float, dlam: float, l: Tensor, s: Tensor, logL: Tensor,
                 logS: Tensor, eta: Tensor, variant: str = "backward"):
        super().__init__()
        if variant not in ("forward", "backward"):
            raise ValueError(f"variant must be 'forward' or 'backward', got {variant!r}")
        self.name, self.variant, self.jumps_denoiser = "analytic", variant, True
        self.backward_variant = variant == "backward"
        self.check_range = True         # core.api.Preconditioning: off for checked grid times
        self.lam0, self.dlam, self.n = float(lam0), float(dlam), int(l.numel())
        self.lam1 = self.lam0 + self.dlam * (self.n - 1)
        self.t_min, self.t_max = math.exp(-self.lam1), math.exp(-self.lam0)
        for name, value in (("l_table", l), ("s_table", s), ("logL_table", logL),
                            ("logS_table", logS), ("eta_table", eta)):
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float64).clone())

    @classmethod
    def from_table(cls, table, variant: str = "backward") -> "AnalyticPrecond":
        d = table.dense()
        return cls(d.lam0, d.dlam, torch.from_numpy(d.l), torch.from_numpy(d.s),
                   torch.from_numpy(d.logL),
                   torch.from_numpy(d.logS), torch.from_numpy(d.eta), variant)

    def _lookup(self, t: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """l, L, S, eta at times t (float64)."""
        lam = -torch.log(t)
        tol = 1e-6
        msg = ("Analytic-Precond: time outside the coefficient table range [" +
               str(self.t_min) + ", " + str(self.t_max) + "]")
        exporting = False
        if not torch.jit.is_scripting():     # a static branch: TorchScript skips it
            exporting = torch.compiler.is_exporting()
        if exporting:
            # torch.export (AOTInductor, core/export/aoti.py): no data-dependent Python branch; the
            # same check as an assert op in the graph, which raises with msg at run time
            torch._assert_async(torch.all((lam >= self.lam0 - tol) & (lam <= self.lam1 + tol)),
                                msg)
        elif self.check_range:          # one device sync
            bad = (lam < self.lam0 - tol) | (lam > self.lam1 + tol) | torch.isnan(lam)
            if bool(torch.any(bad)):
                raise RuntimeError(msg)
        l, _, L, S, eta = lookup(lam, self.lam0, self.dlam, self.l_table, self.s_table,
                                 self.logL_table, self.logS_table, self.eta_table)
        return l, L, S, eta

    def forward(self, t: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        t, s = t.double(), s.double()
        l_t, L_t, S_t, eta_t = self._lookup(t)
        l_s, L_s, S_s, eta_s = self._lookup(s)
        d_eta = eta_s - eta_t
        if self.backward_variant:                                         # Table 1
            den = L_s * S_s + (1.0 - l_s) * d_eta
            return L_t * S_s / den, d_eta / den
        f = (L_t * S_t + (l_t - 1.0) * d_eta) / (L_s * S_t)               # Eqn. (14)
        g = d_eta / (L_s * S_t)
        return f, g


# --- registration ----------------------------------------------------------------------------

def _cm(options, ctx):
    return CMPrecond(ctx.diffusion.sigma_data)


def _bcm(options, ctx):
    return BCMPrecond(ctx.diffusion.sigma_data)


def _ctm(options, ctx):
    return CTMPrecond()


def _analytic(options, ctx):
    variant = options.str("variant", "backward", choices=("forward", "backward"))
    return AnalyticPrecond.from_table(ctx.coefficients(), variant)


_analytic.requires_coefficients = True


@hookimpl
def ctmkit_preconditionings():
    return {"cm": _cm, "bcm": _bcm, "ctm": _ctm, "analytic": _analytic}
