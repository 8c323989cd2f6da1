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


def nvshmem_device_library(include_dir: str | None) -> str | None:
    """``libnvshmem_device.a`` beside ``include_dir`` when ``EP_TRAIN_NVSHMEM_DEVICE=1`` asks for it.

    With it the kernels are compiled with ``-rdc=true`` and device-linked against NVSHMEM's device
    library: the low-latency kernels can then reach peers that have no load/store mapping (other
    nodes) by NVSHMEM puts.  Off by default until the relocatable build is measured against the
    plain one; the one-node paths need none of it.
    """
    if os.environ.get("EP_TRAIN_NVSHMEM_DEVICE", "") in ("", "0"):
        return None
    path = None if include_dir is None else os.path.join(os.path.dirname(include_dir), "lib", "libnvshmem_device.a")
    if path is None or not os.path.isfile(path):
        raise RuntimeError(f"EP_TRAIN_NVSHMEM_DEVICE=1, but libnvshmem_device.a was not found (looked at {path}; "
                           "pip install nvidia-nvshmem-cu13, or set NVSHMEM_HOME)")  # fmt: skip
    return path


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
    arch = ["-gencode", "arch=compute_90,code=sm_90"]  # ep_train/_ext.py BUILT_CAPABILITY
    nvcc = ["-O3", "-std=c++17", *arch, "-lineinfo"]
    link = [*_shared_libstdcxx(), "-ldl"]
    device_lib = nvshmem_device_library(nvshmem_include)
    flags, extra = {"cxx": cxx, "nvcc": nvcc}, {}
    if device_lib is not None:
        cxx.append("-DEP_TRAIN_NVSHMEM_DEVICE")
        nvcc += ["-rdc=true", "-DEP_TRAIN_NVSHMEM_DEVICE"]
        # NVSHMEM's device headers use the half/bfloat16 operators that torch's default flags hide.
        nvcc += [f"-U__CUDA_NO_{what}__" for what in ("HALF_OPERATORS", "HALF_CONVERSIONS", "BFLOAT16_CONVERSIONS",
                                                      "HALF2_OPERATORS")]  # fmt: skip
        # The device link resolves the kernels' NVSHMEM calls; the host link takes the library's
        # host objects (its init and the registration of this module's device state).
        extra = dict(dlink=True, dlink_libraries=["nvshmem_device"], library_dirs=[os.path.dirname(device_lib)])
        flags["nvcc_dlink"] = list(arch)
        link.append(device_lib)
    ext = CUDAExtension(
        name="ep_train._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=flags,
        extra_link_args=link,
        **extra,
    )
    print(f"ep_train: building ep_train._C with CUDA {torch.version.cuda} from {len(sources)} files, NVSHMEM headers: "
          f"{nvshmem_include or 'not found (CUDA IPC peers only)'}, NVSHMEM device library: "
          f"{device_lib or 'no (EP_TRAIN_NVSHMEM_DEVICE=1 adds it)'}", file=sys.stderr)  # fmt: skip
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=find_packages(include=["ep_train", "ep_train.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
