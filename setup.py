"""Build spiel: the Python package plus the optional CUDA extension ``spiel._C``.

Install (torch must already be installed: it is taken from the environment, not from build isolation)::

    pip install --no-build-isolation -e .            # editable, builds spiel._C if a CUDA toolkit is found
    python setup.py build_ext --inplace              # (re)build only the extension, in place

The extension is built from the sources listed in ``csrc/SOURCES`` (one path per line, relative to the
repository root; ``#`` starts a comment). ``CMakeLists.txt`` builds the same list into the same module.

Environment switches:

``SPIEL_SKIP_CUDA_BUILD=1``
    Do not build ``spiel._C``: a pure-Python install using the PyTorch and Triton backends only.
``SPIEL_CUDA_ARCHS``
    GPU architectures to compile for, ``;``- or ``,``-separated (default ``8.0;9.0a``). ``X.Y`` gives
    ``-gencode=arch=compute_XY,code=sm_XY``; an ``a`` suffix (``9.0a``) targets the architecture-specific
    variant (``compute_90a``/``sm_90a``); a ``+PTX`` suffix also embeds PTX for newer GPUs. ``9.0a`` (H100,
    H200) builds the wgmma/TMA kernel of sddmm's dense_tile strategy; with plain ``9.0`` that strategy
    runs the portable WMMA kernel.
``MAX_JOBS``
    Parallel compile jobs (ninja). Default: ``min(cpu cores, RAM in GiB / 4)``, at least 1 -- each nvcc job
    on a file including the torch headers can take several GiB.
``NVCC_THREADS``
    Threads of each nvcc invocation (``nvcc --threads``, parallel over the architectures); default 1.
``CUDA_HOME`` / ``CUDA_PATH``
    The CUDA toolkit. Without them the toolkit is found from ``nvcc`` on ``PATH``; when that ``nvcc`` is a
    wrapper script outside a toolkit (e.g. ``/usr/local/bin/nvcc``), ``/usr/local/cuda`` is used. With no
    toolkit at all (or a CPU-only torch) the package installs without the extension and says so.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
SOURCES_FILE = ROOT / "csrc" / "SOURCES"
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def log(msg: str) -> None:
    print(f"spiel setup: {msg}", file=sys.stderr, flush=True)


def read_version() -> str:
    text = (ROOT / "spiel" / "version.py").read_text()
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    if not match:
        raise RuntimeError("spiel/version.py does not define __version__")
    return match.group(1)


def read_sources(path: Path = SOURCES_FILE, check_exists: bool = True) -> List[str]:
    """The extension's sources from csrc/SOURCES (repository-relative paths, comments and blanks skipped)."""
    sources = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            sources.append(line)
    if not sources:
        raise RuntimeError(f"{path} lists no sources")
    missing = [s for s in sources if not (path.parent.parent / s).is_file()]
    if check_exists and missing:
        raise RuntimeError(f"{path} lists sources that do not exist: {', '.join(missing)}")
    return sources


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def parse_cuda_archs(spec: Optional[str] = None) -> List[str]:
    """``"8.0;9.0a,8.6+PTX"`` -> ``["8.0", "9.0a", "8.6+PTX"]`` (validated)."""
    if spec is None:
        spec = os.environ.get("SPIEL_CUDA_ARCHS", "") or DEFAULT_CUDA_ARCHS
    archs = [a.strip() for a in re.split(r"[;,\s]+", spec) if a.strip()]
    if not archs:
        raise ValueError("SPIEL_CUDA_ARCHS is empty")
    for arch in archs:
        if not re.fullmatch(r"\d+\.\d+[af]?(\+PTX)?", arch):
            raise ValueError(f"SPIEL_CUDA_ARCHS: bad architecture {arch!r} (expected e.g. 8.0, 9.0a, 8.6+PTX)")
    return archs


def cuda_arch_flags(archs: List[str]) -> List[str]:
    """nvcc ``-gencode`` flags for ``archs`` (as parse_cuda_archs returns them)."""
    flags = []
    for arch in archs:
        ptx = arch.endswith("+PTX")
        base = arch[: -len("+PTX")] if ptx else arch
        major, minor = base.split(".")
        num = major + minor  # "9.0a" -> "90a"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def arch_defines(archs: List[str]) -> List[str]:
    """Macros for both compilers: ``SPIEL_BUILD_SM90A`` when ``9.0a`` is built (the sm90a kernels are in, and
    the host may dispatch to them on compute capability 9.0 devices)."""
    return ["-DSPIEL_BUILD_SM90A"] if any(a.split("+")[0] == "9.0a" for a in archs) else []


def default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        ram_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        ram_gib = 4.0 * cores
    return max(1, min(cores, int(ram_gib // 4)))


def _is_toolkit(home: Optional[str]) -> bool:
    if not home:
        return False
    home_p = Path(home)
    has_nvcc = (home_p / "bin" / "nvcc").is_file()
    has_headers = (home_p / "include" / "cuda_runtime.h").is_file() or any(
        home_p.glob("targets/*/include/cuda_runtime.h"))
    return has_nvcc and has_headers


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root, or None. Order: CUDA_HOME, CUDA_PATH, nvcc on PATH (resolving symlinks; a
    wrapper script outside a toolkit is skipped), /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            if _is_toolkit(home):
                return str(Path(home).resolve())
            log(f"{var}={home} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h); ignoring it")
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = str(Path(nvcc).resolve().parent.parent)
        if _is_toolkit(home):
            return home
    if _is_toolkit("/usr/local/cuda"):
        return str(Path("/usr/local/cuda").resolve())
    return None


def _extra_include_dirs(cuda_home: str) -> List[str]:
    """A minimal toolkit may lack the cuBLAS/cuSPARSE headers that ATen's CUDA headers include; the
    nvidia-* wheels torch depends on ship them (site-packages/nvidia/*/include)."""
    if (Path(cuda_home) / "include" / "cusparse.h").is_file():
        return []
    dirs = []
    for entry in sys.path:
        nvidia = Path(entry) / "nvidia"
        if nvidia.is_dir():
            for header in sorted(nvidia.glob("*/include/cusparse.h")):
                dirs.append(str(header.parent))
    return dirs[:1]


def cuda_extensions():
    """``(ext_modules, cmdclass)``: the spiel._C extension, or nothing (with a message saying why)."""
    if env_flag("SPIEL_SKIP_CUDA_BUILD"):
        log("SPIEL_SKIP_CUDA_BUILD is set: installing without the CUDA extension spiel._C")
        return [], {}
    try:
        import torch
    except ImportError:
        log("torch is not importable: installing without spiel._C "
            "(install torch first, then `pip install --no-build-isolation -e .`)")
        return [], {}
    if torch.version.cuda is None:
        log(f"torch {torch.__version__} has no CUDA support: installing without spiel._C")
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home is None:
        log("no CUDA toolkit found (set CUDA_HOME): installing without spiel._C; "
            "the PyTorch and Triton backends remain available")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when it is first imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    archs = parse_cuda_archs()
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    nvcc_threads = os.environ.get("NVCC_THREADS", "1").strip() or "1"
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", f"--threads={int(nvcc_threads)}"]
    nvcc_flags += cuda_arch_flags(archs)
    nvcc_flags += arch_defines(archs)
    cxx_flags = ["-O3"] + arch_defines(archs)
    sources = read_sources()
    log(f"building spiel._C from {len(sources)} sources with CUDA_HOME={cuda_home}, archs {archs}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']}, NVCC_THREADS={nvcc_threads}")
    for inc in _extra_include_dirs(cuda_home):  # searched after the toolkit's own include directory
        log(f"{cuda_home}/include has no cusparse.h: also searching {inc} (after the toolkit)")
        cxx_flags += ["-idirafter", inc]
        nvcc_flags += [f"-Xcompiler=-idirafter,{inc}"]
    ext = CUDAExtension(
        name="spiel._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def main() -> None:
    ext_modules, cmdclass = cuda_extensions()
    readme = ROOT / "README.md"
    setup(
        version=read_version(),
        long_description=readme.read_text() if readme.is_file() else "",
        long_description_content_type="text/markdown",
        packages=find_packages(include=["spiel", "spiel.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
