"""Build script for ichiban_comm.

Builds one extension module, ``ichiban_comm._C``, from ``csrc/``:

* the C++ sources always;
* the CUDA sources in ``csrc/cuda/`` when torch was built with CUDA and a CUDA
  toolkit (nvcc) is found, unless ``ICHIBAN_FORCE_CPU=1``.

Everything the build needs is located here so that the user sets nothing:
the real CUDA toolkit behind an ``nvcc`` wrapper script, the CUDA math-library
headers shipped in the ``nvidia-*`` pip wheels, a default arch list when no GPU
is visible, and a compile-job cap that fits the machine's memory.

Install with ``pip install --no-build-isolation .`` (or ``-e .``): the extension
must be compiled against the torch that will import it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _log(msg: str) -> None:
    print(f"[ichiban_comm setup] {msg}", file=sys.stderr, flush=True)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------
# CUDA toolkit discovery (must run before torch.utils.cpp_extension is imported:
# it reads CUDA_HOME once at import time).
# ---------------------------------------------------------------------------


def _is_toolkit(path: str | None) -> bool:
    if not path:
        return False
    has_nvcc = os.path.isfile(os.path.join(path, "bin", "nvcc"))
    has_cudart = any(
        glob.glob(os.path.join(path, sub, "libcudart.so*"))
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                    os.path.join("targets", "sbsa-linux", "lib"))
    )
    return has_nvcc and has_cudart


def _toolkit_from_nvcc(nvcc: str) -> str | None:
    """The toolkit behind an nvcc on the PATH, which may be a wrapper script."""
    real = os.path.realpath(nvcc)
    candidate = os.path.dirname(os.path.dirname(real))
    if _is_toolkit(candidate):
        return candidate
    # A wrapper script: look for the real nvcc it execs.
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if b"\0" not in head:
            for m in re.finditer(r"(/[^\s\"']+)/bin/nvcc", head.decode(errors="replace")):
                if _is_toolkit(m.group(1)):
                    return m.group(1)
    except OSError:
        pass
    # Ask nvcc itself: --dryrun prints the TOP of its installation.
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=30)
        m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if m:
            top = os.path.normpath(m.group(1).strip("\"'"))
            if _is_toolkit(top):
                return top
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        found = _toolkit_from_nvcc(nvcc)
        if found:
            return found
    for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]:
        if _is_toolkit(cand):
            return cand
    return None


def find_nvidia_wheel_includes() -> list[str]:
    """Header dirs of the CUDA math libraries installed as nvidia-* pip wheels.

    torch's CUDA headers (ATen/cuda/CUDAContext.h) include cusparse.h / cublas.h;
    a core-only toolkit lacks them, torch's CUDA wheels ship them here.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if glob.glob(os.path.join(inc, "cusparse*.h")) or glob.glob(os.path.join(inc, "cublas*.h")):
                dirs.append(inc)
    return dirs


FORCE_CPU = _env_flag("ICHIBAN_FORCE_CPU")
CUDA_HOME = None if FORCE_CPU else find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

WITH_CUDA = bool(torch.version.cuda) and CUDA_HOME is not None and not FORCE_CPU
if FORCE_CPU:
    _log("ICHIBAN_FORCE_CPU=1: building the C++ sources only")
elif not torch.version.cuda:
    _log(f"torch {torch.__version__} has no CUDA: building the C++ sources only")
elif CUDA_HOME is None:
    _log("no CUDA toolkit found (nvcc not on PATH, CUDA_HOME unset): building the C++ sources only")
else:
    _log(f"CUDA toolkit: {CUDA_HOME} (torch built with CUDA {torch.version.cuda})")

# torch's arch detection raises IndexError when no GPU is visible and the list is unset.
if WITH_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    _log(f"TORCH_CUDA_ARCH_LIST unset: using {os.environ['TORCH_CUDA_ARCH_LIST']}")

# Cap parallel compile jobs: one torch-heavy C++/CUDA translation unit peaks near
# 2-3 GiB, so a 2-core 24 GiB machine runs 2, a 16-core 32 GiB one runs ~10.
if not os.environ.get("MAX_JOBS"):
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8.0
    jobs = max(1, min(os.cpu_count() or 1, int(mem_gib // 3)))
    os.environ["MAX_JOBS"] = str(jobs)


def _compiler_id() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.stdout else cxx
    except (OSError, subprocess.SubprocessError):
        return cxx


def _nvcc_id() -> str | None:
    if not WITH_CUDA:
        return None
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=30)
        m = re.search(r"release ([\d.]+)", out.stdout)
        return f"nvcc {m.group(1)}" if m else "nvcc"
    except (OSError, subprocess.SubprocessError):
        return "nvcc"


def write_build_info() -> None:
    """Facts about this build, read by ichiban_comm before it loads _C."""
    info = {
        "version": VERSION,
        "torch": torch.__version__.split("+")[0],
        "torch_full": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": WITH_CUDA,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else "",
        "cuda_home": CUDA_HOME if WITH_CUDA else None,
        "compiler": _compiler_id(),
        "nvcc": _nvcc_id(),
        "python": ".".join(map(str, sys.version_info[:3])),
    }
    path = os.path.join(ROOT, "ichiban_comm", "_build_info.py")
    body = "# Generated by setup.py at build time; do not edit.\nBUILD_INFO = " + repr(info) + "\n"
    old = open(path).read() if os.path.exists(path) else None
    if old != body:
        with open(path, "w") as f:
            f.write(body)


def extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # Our files compile warning-free under -Wall -Wextra. torch's own headers do
    # not (unused parameters), so they are marked as system headers: with gcc a
    # directory given by both -I and -isystem is searched as a system directory.
    from torch.utils.cpp_extension import include_paths

    system_includes = [f for inc in include_paths() for f in ("-isystem", inc)]
    warn = ["-Wall", "-Wextra"]
    cxx_flags = ["-O3", "-fvisibility=hidden", "-pthread"] + warn + system_includes
    # Python's own CFLAGS carry -g. Debug info through torch's headers doubles the compile time
    # of every file (the build is most of a fresh CI run) for backtraces few users read:
    # off unless ICHIBAN_DEBUG_INFO=1.
    if os.environ.get("ICHIBAN_DEBUG_INFO", "0") != "1":
        cxx_flags.append("-g0")
    define_macros = [("ICHIBAN_VERSION", f'"{VERSION}"')]
    include_dirs = [os.path.join(ROOT, "csrc")]
    libraries = ["rt", "dl"]  # shm_open (older glibc), dlopen of libzstd
    if WITH_CUDA:
        define_macros.append(("ICHIBAN_WITH_CUDA", "1"))
        include_dirs += find_nvidia_wheel_includes()
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", f"--threads={min(2, int(os.environ['MAX_JOBS']))}"]
        return CUDAExtension(
            "ichiban_comm._C", cpp + cu,
            include_dirs=include_dirs, define_macros=define_macros, libraries=libraries,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-pthread"],
        )
    return CppExtension(
        "ichiban_comm._C", cpp,
        include_dirs=include_dirs, define_macros=define_macros, libraries=libraries,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-pthread"],
    )


write_build_info()

packages = find_packages(include=["ichiban_comm", "ichiban_comm.*"])
packages.append("ichiban_comm.triton_kernels")

setup(
    name="ichiban_comm",
    version=VERSION,
    description="Topology-aware collectives, async checkpointing, fused Triton kernels "
                "and a token data pipeline for PyTorch training",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"ichiban_comm.triton_kernels": "triton_kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.13", "numpy", "tokenizers"],
    extras_require={
        "topology": ["nvidia-ml-py"],
        "test": ["pytest", "pytest-timeout"],
        "bench": ["mpi4py", "mpich"],
        "parquet": ["pyarrow"],
        "report": ["matplotlib"],  # the figure of `ichiban-train report`
    },
    entry_points={
        "console_scripts": ["ichiban-train=ichiban_comm.train:main",
                            "ichiban-data=ichiban_comm.data.cli:main"],
        "torch.distributed.backends": ["ichiban=ichiban_comm.distributed.backend:_entry_point"],
    },
    zip_safe=False,
)
