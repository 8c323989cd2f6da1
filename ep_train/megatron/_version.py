"""Which megatron-core releases this adapter is tested with, and the check made at import."""

from __future__ import annotations

import importlib.metadata
import re

__all__ = ["MEGATRON_CORE_TESTED", "megatron_core_version", "require_megatron_core"]

#: Inclusive (major, minor) range: 0.16.x is tested on CPU CI (Python 3.11), 0.19.x on the GPU
#: machine (Python 3.12; megatron-core 0.19 needs Python >= 3.12).
MEGATRON_CORE_TESTED = ((0, 16), (0, 19))

_INSTALL = (
    'pip install "megatron-core==0.16.1" (Python 3.11) or "megatron-core==0.19.2" (Python >= 3.12); '
    "install it with --no-deps next to an existing torch and add numpy and packaging"
)


def megatron_core_version() -> tuple[int, int, int] | None:
    """``(major, minor, patch)`` of the installed megatron-core, or None when it is absent."""
    try:
        raw = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        try:
            from megatron.core import package_info  # source checkouts have no dist metadata
        except ImportError:
            return None
        raw = package_info.__version__
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", raw)
    if match is None:
        raise ImportError(f"ep_train.megatron cannot parse the megatron-core version {raw!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def require_megatron_core() -> tuple[int, int, int]:
    """The installed version; ImportError (with the install command) if absent or out of range."""
    version = megatron_core_version()
    if version is None:
        raise ImportError(f"ep_train.megatron needs megatron-core, which is not installed: {_INSTALL}")
    low, high = MEGATRON_CORE_TESTED
    if not low <= version[:2] <= high:
        found = ".".join(map(str, version))
        raise ImportError(
            f"ep_train.megatron is tested with megatron-core {low[0]}.{low[1]}.x to {high[0]}.{high[1]}.x, "
            f"found {found}: {_INSTALL}"
        )
    return version
