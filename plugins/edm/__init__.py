"""NVlabs EDM teachers: a safe reader for EDM snapshot pickles (``unpickle``) and ctmkit's own
re-implementation of their networks (``precond``: EDMPrecond / VPPrecond / VEPrecond around
``songunet.SongUNet`` (DDPM++ / NCSN++) and ``dhariwal.DhariwalUNet`` (ADM)), with EDM's
parameter names so the pickled weights load with ``strict=True``."""
