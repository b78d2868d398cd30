"""Analytic-Precond coefficients: estimation (Appendix B.1), integration, the HDF5 store."""

from core.diffusion.coefficients.table import CoefficientTable  # noqa: F401
