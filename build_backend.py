"""PEP 517 build backend for `pip install .`: setuptools.build_meta, compiled against the torch
the package will run with.

The extension links against torch's C++ library, whose ABI changes with every release, so
it loads only under the torch it was compiled with. With `torch` as a static build
requirement, pip's isolated build installs the newest torch (5 GB for a CUDA build) and
compiles against it, while the environment being installed into keeps the torch it already
had: "Successfully installed", then an extension that cannot load.

So torch is not a static build requirement (pyproject.toml). Under pip's default build
isolation the hooks below run on the target environment's own interpreter with its
site-packages hidden (PYTHONPATH points at a sitecustomize that removes them). Each hook
asks that interpreter, with the isolation variables removed, whether it has torch >= 2.4:

- yes: nothing is installed; the folder holding the target's torch is appended to sys.path
  (after the build environment's own packages), so setup.py compiles against exactly the
  torch the package will import, with no download;
- no (a fresh environment, or torch older than pip would keep): `torch>=2.4` is a build
  requirement as before, and pip installs the same newest release to run it.

Front-ends that build with another interpreter (`python -m build`, uv, pip's opt-in
venv isolation) see no torch in the target and fall back to the second case; should the
torch they build against differ from the one that runs, `import mole_kernels` names both
and the command that rebuilds (mole_kernels/_build_check.py). With --no-build-isolation
the hooks import the target's torch directly and nothing here applies.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

from setuptools import build_meta as _setuptools

from setup import log

TORCH_REQUIREMENT = "torch>=2.4"
MIN_TORCH = (2, 4)
# Asks an interpreter for its torch without importing it (an import costs seconds).
_PROBE = ("import importlib.metadata as m, importlib.util as u, json, os; s = u.find_spec('torch'); "
          "print(json.dumps(s and s.origin and [m.version('torch'), os.path.dirname(os.path.dirname(s.origin))]))")


def target_torch():
    """(version, folder holding the torch package) of this interpreter's environment, seen without
    pip's isolation; None when it has no usable torch (or cannot be asked)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        found = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    if not found:
        return None
    version = tuple(int(x) for x in re.findall(r"\d+", found[0])[:2])
    return tuple(found) if version >= MIN_TORCH else None


def _torch_requirements(say=False):
    """[] when this process can build against a torch (its own, or the target's put on sys.path);
    else the requirement pip must install into the build environment."""
    if importlib.util.find_spec("torch") is not None:
        return []
    found = target_torch()
    if found is None:
        return [TORCH_REQUIREMENT]
    _, folder = found
    sys.path.append(folder)
    if say:
        # The version itself is said once, by the compile step (torch.__version__, e.g. 2.14.1+cu130;
        # the package metadata read here may say 2.14.1).
        log(f"building against the torch already installed in this environment ({folder}); nothing is downloaded")
    return []


# Not setuptools' own get_requires hooks: they run setup.py, which imports torch before it is there.
# (The sdist needs torch too: setup.py imports it to describe the extension.)
def get_requires_for_build_wheel(config_settings=None):
    return _torch_requirements(say=True)


def get_requires_for_build_editable(config_settings=None):
    return _torch_requirements(say=True)


def get_requires_for_build_sdist(config_settings=None):
    return _torch_requirements(say=True)


def _with_torch(hook):
    def run(*args, **kwargs):
        _torch_requirements()  # each hook runs in a fresh process: the target's torch goes on sys.path again
        return hook(*args, **kwargs)

    run.__name__ = hook.__name__
    return run


prepare_metadata_for_build_wheel = _with_torch(_setuptools.prepare_metadata_for_build_wheel)
prepare_metadata_for_build_editable = _with_torch(_setuptools.prepare_metadata_for_build_editable)
build_wheel = _with_torch(_setuptools.build_wheel)
build_editable = _with_torch(_setuptools.build_editable)
build_sdist = _with_torch(_setuptools.build_sdist)
