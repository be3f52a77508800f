"""The diffusers releases our patch-wise forwards are tested against, checked where a model is built.

The families' blocks (``flux``, ``sd3``, ``pixart``) run diffusers' modules piece by piece, so they depend on
diffusers' module internals, not only on its public forward. ``requirements.txt`` and ``pyproject.toml`` pin
the same range as ``TESTED``; a release is adopted by raising the cap once the model tests against diffusers'
own forward pass on it (README, "diffusers releases").

Outside the range: older than the minimum is an error (the modules we use may be missing or different);
newer than the cap is a warning, not an error, because ComfyUI-Manager may have installed a newer diffusers
for another node pack, and refusing would make the user choose between the two. The warning says what to
install should a result look wrong or a forward fail.
"""
from __future__ import annotations

import logging
import re
from importlib import metadata

log = logging.getLogger("comfy_pipefusion.models")

TESTED = ((0, 35), (0, 43))
"""[minimum, cap): the diffusers releases (major, minor) the suite passes on; the cap is the first untested minor."""


class DiffusersVersionError(RuntimeError):
    """The installed diffusers is older than the oldest release the engine supports."""


def _fmt(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def requirement() -> str:
    """The pip requirement that installs a tested diffusers, e.g. ``diffusers>=0.35,<0.43``."""
    return f"diffusers>={_fmt(TESTED[0])},<{_fmt(TESTED[1])}"


def installed() -> str:
    """The installed diffusers' version string."""
    return metadata.version("diffusers")


def check(version: str | None = None) -> str | None:
    """None when ``version`` (default: the installed diffusers) is in ``TESTED``; the warning text when it is
    newer; raises DiffusersVersionError when it is older or unreadable."""
    version = installed() if version is None else version
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        raise DiffusersVersionError(f"cannot read the installed diffusers version {version!r}: install a "
                                    f"tested release with: pip install \"{requirement()}\"")
    got = (int(m.group(1)), int(m.group(2)))
    if got < TESTED[0]:
        raise DiffusersVersionError(f"diffusers {version} is older than {_fmt(TESTED[0])}, the oldest release "
                                    f"comfy-pipefusion runs on: install a tested release with: "
                                    f"pip install \"{requirement()}\"")
    if got >= TESTED[1]:
        return (f"diffusers {version} is newer than the releases comfy-pipefusion is tested on "
                f"({requirement()}): its patch-wise forwards use diffusers' module internals, which may have "
                f"changed; if a job fails or an image looks wrong, install a tested release with: "
                f"pip install \"{requirement()}\"")
    return None


def model_class(name: str):
    """diffusers' model class ``name`` (e.g. ``FluxTransformer2DModel``), after checking the installed version."""
    warning = check()
    if warning:
        log.warning(warning)
    import diffusers

    return getattr(diffusers, name)
