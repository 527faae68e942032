"""Loads the compiled library (which registers torch.ops.mole_kernels.*) and the fake kernels."""
import json
import os

import torch

try:
    from . import _C  # noqa: F401  (importing it registers the ops)
except ImportError as e:  # pragma: no cover - only without a build
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _hint = (
        f" Python imported the source tree at {_root} (it is the current folder or on sys.path), which has no "
        "compiled extension: run from another folder to use the installed package, or build in place with "
        "`python setup.py build_ext --inplace`."
        if os.path.exists(os.path.join(_root, "setup.py"))
        else " Install the package with `pip install --no-build-isolation .`."
    )
    raise ImportError(f"mole_kernels._C is not built.{_hint} Cause: {e}") from e

ops = torch.ops.mole_kernels


def build_info() -> dict:
    """What the extension was compiled with (torch version, CUDA on/off, CUDA archs) and the CPU
    instruction set its CPU kernels run (`cpu_isa`, `cpu_isa_quant`: after the MOLE_KERNELS_CPU_ISA cap)."""
    info = json.loads(ops.build_info())
    info["torch_runtime"] = torch.__version__
    info["cuda_runtime_available"] = torch.cuda.is_available()
    info["cpu_isa"], info["cpu_isa_quant"] = ops.cpu_isa("lut_gather"), ops.cpu_isa("lut_gather_quant")
    return info


def gather_shape(lut, ids, weights, layer, dim=None):
    """The shape lut_gather returns (the C++ plan checks everything else). `dim`: the hidden size
    when the table's last axis is not it (a quantized table's last axis is bytes per row)."""
    torch._check(lut.dim() in (3, 4), lambda: f"lut_gather: lut must be [V, L, E, D] or [V, E, D], got {tuple(lut.shape)}")
    E, D = lut.shape[-2], lut.shape[-1] if dim is None else dim
    if weights is not None:
        return (*ids.shape, D)
    if layer is not None or lut.dim() == 3:
        return (*ids.shape, E, D)
    return (*ids.shape, lut.shape[1], E, D)


@torch.library.register_fake("mole_kernels::lut_gather")
def _lut_gather_fake(lut, ids, weights=None, layer=None):
    return ids.new_empty(gather_shape(lut, ids, weights, layer), dtype=lut.dtype)


@torch.library.register_fake("mole_kernels::lut_gather_out")
def _lut_gather_out_fake(out, lut, ids, weights=None, layer=None, accumulate=False, faults=None):
    want = gather_shape(lut, ids, weights, layer)
    torch._check(tuple(out.shape) == tuple(want), lambda: f"lut_gather: out must have shape {want}")
    return None
