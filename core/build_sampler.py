"""``ctmkit build-sampler``: configure and build the C++ sampler ``ctm_sample`` against the
installed torch wheel (``python tools/build_cpp.py`` is the same program).

    ctmkit build-sampler            # -> prints the path of build/ctm_sample

Configures ``build/`` with CMake on the first run (or when torch moved, or with --clean) and
then runs ``cmake --build``, which does nothing when everything is up to date. The torch
package directory and its C++ ABI come from this Python's torch; no CUDA toolkit is needed,
even with the CUDA wheel (see cpp_runtime/cmake/TorchWheel.cmake).

It builds from a checkout of the repository (``CMakeLists.txt`` and ``cpp_runtime/`` beside
``core/``, as ``pip install -e .`` leaves them); it needs ``cmake`` on PATH and a C++17
compiler. Anything missing is one ``error:`` line saying what, exit status 2.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from core.base.errors import UserError

#: the checkout this package was imported from (the folder holding core/)
ROOT = Path(__file__).resolve().parent.parent
BINARY = "ctm_sample"


def checkout() -> Path:
    """The repository root holding the C++ sources, or a UserError saying what is missing."""
    missing = [p for p in ("CMakeLists.txt", "cpp_runtime") if not (ROOT / p).exists()]
    if missing:
        raise UserError(f"ctm_sample builds from a ctmkit checkout, and {ROOT} has no "
                        f"{' or '.join(missing)} (an installed, non-editable ctmkit ships no C++ "
                        f"sources): clone the repository, pip install -e . there and run "
                        f"ctmkit build-sampler in it")
    return ROOT


def torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("torch is not installed for " + sys.executable)
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def cached(build: Path, key: str) -> str | None:
    cache = build / "CMakeCache.txt"
    if not cache.is_file():
        return None
    m = re.search(rf"^{re.escape(key)}:[A-Z]+=(.*)$", cache.read_text(errors="replace"), re.M)
    return m.group(1) if m else None


def run(cmd: list[str], quiet: bool) -> None:
    if not quiet:
        print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE if quiet else sys.stderr,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        if quiet:
            sys.stderr.write(proc.stdout)
        raise UserError(f"{Path(cmd[0]).name} failed with status {proc.returncode} (its output "
                        f"is above)")


def build(build_dir: Path, *, jobs: int = 2, build_type: str = "Release", clean: bool = False,
          quiet: bool = False, cmake_args: tuple[str, ...] = ()) -> Path:
    """Configure (when needed) and build; returns the path of ctm_sample."""
    root = checkout()
    cmake = shutil.which("cmake")
    if cmake is None:
        raise UserError("cmake not found on PATH (ctm_sample needs CMake >= 3.18 and a C++17 "
                        "compiler: apt-get install cmake g++, or pip install cmake)")
    build_dir = build_dir if build_dir.is_absolute() else root / build_dir
    if clean and build_dir.exists():
        shutil.rmtree(build_dir)
    tdir = torch_dir()
    configured = (cached(build_dir, "CTMKIT_TORCH_DIR") == str(tdir)
                  and cached(build_dir, "CMAKE_BUILD_TYPE") == build_type and not cmake_args)
    if not configured:
        import torch   # only here: the ABI flag; importing torch takes a while

        cmd = [cmake, "-S", str(root), "-B", str(build_dir),
               f"-DCMAKE_BUILD_TYPE={build_type}", f"-DCTMKIT_TORCH_DIR={tdir}",
               f"-DCTMKIT_TORCH_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
               f"-DCTMKIT_PYTHON={sys.executable}", *cmake_args]
        if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
            cmd += ["-G", "Ninja"]
        run(cmd, quiet)
    run([cmake, "--build", str(build_dir), "-j", str(jobs)], quiet)
    binary = build_dir / BINARY
    if not os.access(binary, os.X_OK):
        raise UserError(f"the build did not produce {binary}")
    return binary


def main(argv: list[str] | None = None, prog: str = "ctmkit build-sampler") -> int:
    from core.cli import Parser

    ap = Parser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    ap.add_argument("--build-dir", type=Path, default=Path("build"),
                    help="build directory, relative to the repository root (default: build)")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    ap.add_argument("--build-type", default="Release", help="CMAKE_BUILD_TYPE (default Release)")
    ap.add_argument("--clean", action="store_true", help="remove the build directory first")
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="show CMake's output only when it fails")
    ap.add_argument("--cmake-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for the configure step (forces a reconfigure)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        binary = build(args.build_dir, jobs=args.jobs, build_type=args.build_type,
                       clean=args.clean, quiet=args.quiet, cmake_args=tuple(args.cmake_arg))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
