"""The mathematics: EDM's scalings and denoiser, the ODE solvers, time grids, DSM, the solver / loss / sampler bases, Analytic-Precond's coefficients."""
