"""mole_kernels: Mixture-of-Lookup-Experts inference with the lookup tables off the GPU."""
import os as _os
import sys as _sys

__version__ = "0.1.0"
__all__ = [
    "FORMATS",
    "QuantizedLUT",
    "dequantize",
    "quantize",
    "DenseForCausalLM",
    "MoEForCausalLM",
    "MoLEConfig",
    "MoLEForCausalLM",
    "LayerReader",
    "LookupTable",
    "Prefetch",
    "Prefetcher",
    "TableStats",
    "build_info",
    "host_allocations",
    "lut_combine",
    "lut_gather",
    "mole_combine",
    "router_softmax",
]


def _started_as_command() -> bool:
    """True while the `mole-kernels` script or `python -m mole_kernels` imports the package."""
    argv = getattr(_sys, "argv", None) or [""]
    if _os.path.splitext(_os.path.basename(argv[0]))[0] == "mole-kernels":  # the console script
        return True
    # `python -m mole_kernels`: argv[0] is "-m" until runpy has found the module (3.10+ keeps the
    # original command line in sys.orig_argv; on 3.9 the package simply loads eagerly).
    orig = getattr(_sys, "orig_argv", [])
    return argv[0] == "-m" and "-m" in orig and orig[orig.index("-m") + 1:][:1] == ["mole_kernels"]


# `import mole_kernels` loads torch and the compiled extension at once, so that
# torch.ops.mole_kernels.* is registered for anyone who imports the package (that takes
# seconds: torch alone is most of it). The command line must not pay that for --help,
# --version or a bad argument, and its entry point imports this package first; so when the
# package is imported *as the command*, the API below loads on first use instead (PEP 562),
# and each subcommand imports what it needs once its arguments are checked.
if _started_as_command():

    def __getattr__(name):
        if name in __all__:
            from . import _api

            return getattr(_api, name)
        raise AttributeError(f"module 'mole_kernels' has no attribute {name!r}")

else:
    from ._api import *  # noqa: F401,F403
