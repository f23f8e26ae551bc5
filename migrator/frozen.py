"""The single-file build (``packaging/build-binary``): what differs when the interpreter is bundled.

Its bootloaders (PyInstaller's, staticx's) point ``LD_LIBRARY_PATH`` at the libraries they unpacked and add
variables of their own. Programs this tool starts (``mount``, ``umount``, an engine) must see the host's
environment instead: a host ``mount`` linked against the host's libc must not load the bundle's.
"""

from __future__ import annotations

import os
import platform
import sys

from migrator import __version__

_BOOTLOADER_PREFIXES = ("_PYI_", "_MEI", "STATICX_")


def is_frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def restore_host_environment(environ: "os._Environ[str] | dict" = os.environ) -> None:
    """Give ``environ`` back the values the host started the program with (a no-op when not frozen)."""
    if not is_frozen():
        return
    for name in ("LD_LIBRARY_PATH",):
        original = environ.pop(f"{name}_ORIG", None)
        if original is not None:
            environ[name] = original
        else:
            environ.pop(name, None)
    for name in [n for n in environ if n.startswith(_BOOTLOADER_PREFIXES)]:
        del environ[name]


def version() -> str:
    """``--version``: the version, and for the single-file build its architecture and bundled Python."""
    if not is_frozen():
        return f"aufs2overlay {__version__}"
    return (f"aufs2overlay {__version__} (single-file build, {platform.machine()}, "
            f"Python {platform.python_version()})")
