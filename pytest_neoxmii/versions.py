"""The versions of the packages every result depends on, read from package metadata: the pytest process
never imports deepspeed or mii to learn them (importing them is slow and starts their process-wide state)."""
from __future__ import annotations

import importlib.metadata

PACKAGES = ("torch", "transformers", "deepspeed", "deepspeed-mii")
NOT_INSTALLED = "not installed"


def version_of(dist: str) -> str | None:
    """The installed version of one distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str | None]:
    """{package: version}, None for a package that is not installed (as the baselines store it)."""
    return {dist: version_of(dist) for dist in PACKAGES}


def shown_versions() -> dict[str, str]:
    """The same, with "not installed" spelled out (report header, JSON summary, benchmark machine_info)."""
    return {k: NOT_INSTALLED if v is None else v for k, v in installed_versions().items()}
