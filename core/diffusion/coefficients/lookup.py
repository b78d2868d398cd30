"""Run-time lookup of l, s, L, S, eta at arbitrary times from the dense uniform-lambda table.

One TorchScript-able function, used by the exported Analytic-Precond module and by
`CoefficientTable.at`, so both give the same numbers. log L, log S and eta are interpolated by
cubic Hermite with their exact slopes (l, s and L*S), l and s linearly: the forward variant's
f = 1 - (eta_s - eta_t) / S_t (for l ~ 0) cancels when s << t, so eta must be accurate to
~1e-12, which linear interpolation on h ~ 1e-3 is not.
"""

from typing import Tuple

import torch
from torch import Tensor


def lookup(lam: Tensor, lam0: float, dlam: float, l: Tensor, s: Tensor, logL: Tensor,
           logS: Tensor, eta: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(l, s, L, S, eta) at lambda values `lam` (clamped to the table; float64)."""
    n = l.numel()
    pos = torch.clamp((lam - lam0) / dlam, 0.0, float(n - 1))
    i = torch.clamp(torch.floor(pos), 0.0, float(n - 2)).long()
    j = i + 1
    u = pos - i.to(pos.dtype)
    u2, u3 = u * u, u * u * u
    h00, h10 = 2 * u3 - 3 * u2 + 1, u3 - 2 * u2 + u
    h01, h11 = -2 * u3 + 3 * u2, u3 - u2
    l_i, l_j, s_i, s_j = l[i], l[j], s[i], s[j]
    logL_ = h00 * logL[i] + h10 * dlam * l_i + h01 * logL[j] + h11 * dlam * l_j
    logS_ = h00 * logS[i] + h10 * dlam * s_i + h01 * logS[j] + h11 * dlam * s_j
    ls_i, ls_j = torch.exp(logL[i] + logS[i]), torch.exp(logL[j] + logS[j])   # d eta / d lambda
    eta_ = h00 * eta[i] + h10 * dlam * ls_i + h01 * eta[j] + h11 * dlam * ls_j
    return (l_i * (1 - u) + l_j * u, s_i * (1 - u) + s_j * u, torch.exp(logL_), torch.exp(logS_),
            eta_)
