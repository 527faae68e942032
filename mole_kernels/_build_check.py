"""Why `mole_kernels._C` did not load, in one message with the command that fixes it.

The extension only loads under the torch it was compiled against (torch's C++ ABI changes
with every release). The build writes that version next to the extension (`_build_info.json`,
see setup.py), because the extension itself cannot be asked once it fails to load.
"""
import glob
import json
import os
import shlex
import sys

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(PACKAGE_DIR, "_build_info.json")


def recorded_build():
    """{"torch": version, "source": folder it was built from}, or None (no record, or unreadable)."""
    try:
        with open(BUILD_INFO, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("torch"), str) else None


def rebuild_command(source) -> str:
    """The command that rebuilds the extension against the running torch."""
    if os.path.isfile(os.path.join(PACKAGE_DIR, os.pardir, "setup.py")):  # imported from a source tree
        return f"cd {shlex.quote(os.path.dirname(PACKAGE_DIR))} && {shlex.quote(sys.executable)} setup.py build_ext --inplace"
    where = shlex.quote(source) if source and os.path.isfile(os.path.join(source, "setup.py")) else "<mole_kernels source folder>"
    # --no-deps keeps the torch that runs; the build backend compiles against it.
    return f"{shlex.quote(sys.executable)} -m pip install --force-reinstall --no-deps {where}"


def load_error(cause: ImportError, torch_version: str) -> ImportError:
    """The ImportError to raise when `from . import _C` failed with `cause`."""
    build = recorded_build()
    root = os.path.dirname(PACKAGE_DIR)
    built = glob.glob(os.path.join(PACKAGE_DIR, "_C.*"))
    if not built and os.path.isfile(os.path.join(root, "setup.py")):
        return ImportError(
            f"mole_kernels._C is not built: Python imported the source tree at {root} (the current folder "
            "or on sys.path), which has no compiled extension. Run from another folder to use the installed "
            "package (`pytest python_tests` does; `python -m pytest` puts the current folder first), or build "
            f"in place: {rebuild_command(None)}")
    if build is not None and build["torch"] != torch_version:
        return ImportError(
            f"mole_kernels._C was built against torch {build['torch']}, but torch {torch_version} is running "
            f"(an extension loads only under the torch it was compiled with). Rebuild it against this torch: "
            f"{rebuild_command(build.get('source'))}   [loader: {cause}]")
    return ImportError(f"mole_kernels._C failed to load under torch {torch_version}: {cause}. Reinstall the "
                       f"package: {rebuild_command(build and build.get('source'))}")


def mismatch_warning(built_with: str, torch_version: str) -> str:
    """The warning when the extension loaded although it was compiled against another torch."""
    return (f"mole_kernels._C was built against torch {built_with} but torch {torch_version} is running; it "
            f"loaded, but torch's C++ ABI is not stable across releases. Rebuild: "
            f"{rebuild_command((recorded_build() or {}).get('source'))}")
