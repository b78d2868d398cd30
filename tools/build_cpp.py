"""Configure and build the C++ sampler ``ctm_sample`` against the installed torch wheel.

    python tools/build_cpp.py            # -> prints the path of build/ctm_sample

The same program as ``ctmkit build-sampler`` (core/build_sampler.py); this path stays for CI,
the tests and the scripts that call it.
"""

from __future__ import annotations

import sys

import _common  # noqa: F401  (puts the checkout on sys.path)
from core.build_sampler import main

if __name__ == "__main__":
    sys.exit(main(prog="python tools/build_cpp.py"))
