"""Analytic-Precond coefficients: estimation (Appendix B.1), integration, the HDF5 store."""

from core.coefficients.table import CoefficientTable  # noqa: F401
