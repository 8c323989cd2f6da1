"""Build script.  A plain ``pip install`` is pure Python (the ``torch`` backend); where the CUDA
toolkit and a CUDA build of torch are importable at build time (``pip install -e .
--no-build-isolation`` on a GPU machine) it also builds the kernels as ``ep_train._C``."""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _shared_libstdcxx() -> list[str]:
    """Link flags that make the extension use the process's shared libstdc++.

    A compiler built to link its standard library statically (GCC configured with
    ``--with-static-standard-libraries``) puts a second libstdc++ into ``_C``; that copy's locale is
    never set up, and the first error message that formats a number crashes the process.  Naming
    the shared library ahead of the driver's own ``-lstdc++`` keeps the archive out.
    """
    return ["-Wl,--push-state,--no-as-needed", "-l:libstdc++.so.6", "-Wl,--pop-state"]


def nvshmem_include_dir() -> str | None:
    """The include/ of NVSHMEM's pip wheel (nvidia-nvshmem-cu12/-cu13) or of ``$NVSHMEM_HOME``, if present.

    Only the host headers are used (the library itself is loaded at run time), so ``_C`` builds and
    imports without NVSHMEM too; it then offers CUDA IPC peers only.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ep_train_env", os.path.join(ROOT, "ep_train", "_env.py"))
    env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(env)
    for root in env.nvshmem_roots():
        if os.path.isfile(os.path.join(root, "include", "nvshmem.h")):
            return os.path.join(root, "include")
    return None


def cuda_extensions():
    """``(ext_modules, cmdclass)`` for ``ep_train._C``, or empty when this machine cannot build it."""
    if os.environ.get("EP_TRAIN_NO_CUDA_BUILD", "") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    csrc = os.path.join("ep_train", "csrc")
    sources = sorted(
        glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True)
    )
    if not any(s.endswith(".cpp") for s in sources):
        return [], {}
    include_dirs = [
        os.path.join(ROOT, csrc),
        os.path.join(ROOT, csrc, "include"),
        os.path.join(CUDA_HOME, "include", "cccl"),
    ]
    cxx = ["-O3", "-std=c++17"]
    nvshmem_include = nvshmem_include_dir()
    if nvshmem_include is not None:
        include_dirs.append(nvshmem_include)
        cxx.append("-DEP_TRAIN_WITH_NVSHMEM")
    # NOTES: no --use_fast_math: combine must round like the FP32 reference (no flush-to-zero).
    nvcc = ["-O3", "-std=c++17", "-gencode", "arch=compute_90,code=sm_90", "-lineinfo"]
    ext = CUDAExtension(
        name="ep_train._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=[*_shared_libstdcxx(), "-ldl"],
    )
    print(f"ep_train: building ep_train._C with CUDA {torch.version.cuda} from {len(sources)} files, NVSHMEM headers: "
          f"{nvshmem_include or 'not found (CUDA IPC peers only)'}", file=sys.stderr)  # fmt: skip
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=find_packages(include=["ep_train", "ep_train.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
