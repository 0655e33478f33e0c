"""Build script for the ``gpavatar._C`` extension.

CPU kernels are always built.  CUDA kernels are built whenever ``nvcc`` can be
found (``CUDA_HOME`` or ``/usr/local/cuda``) -- a GPU does *not* have to be
visible at build time.  Environment switches:

* ``BUILD_NO_CUDA=1``      build the CPU kernels only;
* ``FORCE_CUDA=1``         fail instead of silently skipping CUDA when nvcc is missing;
* ``TORCH_CUDA_ARCH_LIST`` architectures (default ``"8.0;9.0"``);
* ``GPAVATAR_NO_EXT=1``    install the pure-Python package (torch + Triton paths only);
* ``MAX_JOBS``             parallel compile jobs (ninja).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The first CUDA toolkit with nvcc and its headers (a bare nvcc wrapper on
    PATH does not count: cpp_extension needs <home>/include)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in homes:
        if (
            home
            and os.path.exists(os.path.join(home, "bin", "nvcc"))
            and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
        ):
            return home
    return None


def _pip_cuda_dirs():
    """Headers and libraries of the CUDA runtime wheels that ship with torch.

    A local toolkit may carry only part of the headers torch needs; the
    ``nvidia-*`` wheels torch depends on fill the gap.
    """
    incs, libs = [], []
    for site in sys.path:
        base = os.path.join(site, "nvidia")
        for sub in ("cu13", "cuda_runtime", "cu12"):
            inc, lib = os.path.join(base, sub, "include"), os.path.join(base, sub, "lib")
            if os.path.isdir(inc) and inc not in incs:
                incs.append(inc)
            if os.path.isdir(lib) and lib not in libs:
                libs.append(lib)
    return incs, libs


def _extensions():
    if _flag("GPAVATAR_NO_EXT"):
        return [], {}
    cuda_home = None if _flag("BUILD_NO_CUDA") else _find_cuda_home()
    if cuda_home is None and _flag("FORCE_CUDA"):
        raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
    with_cuda = cuda_home is not None
    if with_cuda:
        # Before importing cpp_extension, which reads CUDA_HOME at import time.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/ext.cpp") + glob.glob("csrc/*/*_cpu.cpp"))
    # torch picks the C++ standard; -g0 drops the debug info Python's flags ask for (2-3x faster builds)
    cxx = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off"]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    extra_link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs, libraries = [], []
    if with_cuda:
        sources += sorted(glob.glob("csrc/*/*.cu") + glob.glob("csrc/*/*_cuda.cpp"))
        define_macros.append(("WITH_CUDA", None))
        incs, libs = _pip_cuda_dirs()
        # -idirafter: the toolkit's own headers win; the wheels only fill gaps.
        gap_fill = [f for inc in incs for f in ("-idirafter", inc)]
        cxx += gap_fill
        library_dirs += libs
        if any(os.path.exists(os.path.join(d, "libcudart.so.13")) for d in libs):
            extra_link.append("-l:libcudart.so.13")
        extra = {
            "cxx": cxx,
            # The .cu files include no torch headers: the toolkit's own are enough.
            "nvcc": ["-O3", "-lineinfo"],
        }
        ext_cls = cpp_extension.CUDAExtension
    else:
        extra = {"cxx": cxx}
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="gpavatar._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=libraries,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=extra_link,
        py_limited_api=False,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
