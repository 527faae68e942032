"""Loads the compiled library (which registers torch.ops.mole_kernels.*) and the fake kernels."""
import json
import operator
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
    """What the extension was compiled with: torch version, CUDA on/off, CUDA archs."""
    info = json.loads(ops.build_info())
    info["torch_runtime"] = torch.__version__
    info["cuda_runtime_available"] = torch.cuda.is_available()
    return info


def check_gather_args(fn: str, lut, ids, weights, layer, out, accumulate, faults):
    """What the op schema cannot say about the public gathers' arguments: each is a dense tensor (or
    None) where one is meant, ``layer`` an int (a bool is not one) and ``accumulate`` a bool. Returns
    ``layer`` as an int (or None). The C++ plan checks shapes, dtypes, devices and overlap."""
    for name, t, optional in (("lut", lut, False), ("ids", ids, False), ("weights", weights, True),
                              ("out", out, True), ("faults", faults, True)):
        if not (isinstance(t, torch.Tensor) or (optional and t is None)):
            raise ValueError(f"{fn}: {name} must be a tensor{' or None' if optional else ''}, got {type(t).__name__}")
        if t is not None and t.layout != torch.strided:
            raise ValueError(f"{fn}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if not isinstance(accumulate, bool):
        raise ValueError(f"{fn}: accumulate must be a bool, got {accumulate!r}")
    if layer is None:
        return None
    try:
        if isinstance(layer, bool):
            raise TypeError
        return operator.index(layer)
    except TypeError:
        raise ValueError(f"{fn}: layer must be an int or None, got {layer!r}") from None


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


def check_fake_devices(lut, ids, **others):
    """The device rule of the C++ plan, for the fake kernels: they also run for real ``meta`` tensors,
    where all-meta inputs give a meta result, but a meta table with real ids (or real ids with a meta
    table) would return uninitialised memory: refused."""
    zero_copy = lut.device.type == "cpu" and ids.device.type == "cuda"
    torch._check_value(lut.device == ids.device or zero_copy,
                       lambda: f"lut_gather: ids must be on the table's device ({lut.device}) or on a CUDA device with "
                               f"a pinned CPU table, got ids on {ids.device}")
    for name, t in others.items():
        torch._check_value(t is None or t.device == ids.device,
                           lambda: f"lut_gather: {name} must be on ids' device ({ids.device}), got {t.device}")


@torch.library.register_fake("mole_kernels::lut_gather")
def _lut_gather_fake(lut, ids, weights=None, layer=None):
    check_fake_devices(lut, ids, weights=weights)
    return ids.new_empty(gather_shape(lut, ids, weights, layer), dtype=lut.dtype)


@torch.library.register_fake("mole_kernels::lut_gather_out")
def _lut_gather_out_fake(out, lut, ids, weights=None, layer=None, accumulate=False, faults=None):
    check_fake_devices(lut, ids, weights=weights, out=out, faults=faults)
    want = gather_shape(lut, ids, weights, layer)
    torch._check(tuple(out.shape) == tuple(want), lambda: f"lut_gather: out must have shape {want}")
    return None
