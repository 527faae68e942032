"""Loads the compiled library (which registers torch.ops.mole_kernels.*) and the fake kernels."""
import json
import warnings

import torch

try:
    from . import _C  # noqa: F401  (importing it registers the ops)
except ImportError as e:
    from ._build_check import load_error

    # One message naming the cause and the fix; the chained traceback (a "partially initialized
    # module ... circular import" line when run from the source tree) would only bury it.
    raise load_error(e, torch.__version__) from None

ops = torch.ops.mole_kernels
_built_with = json.loads(ops.build_info())["torch"]
if _built_with != torch.__version__:
    from ._build_check import mismatch_warning

    warnings.warn(mismatch_warning(_built_with, torch.__version__), RuntimeWarning, stacklevel=2)


def build_info() -> dict:
    """What the extension was compiled with (torch version, CUDA on/off, CUDA archs) and the CPU
    instruction set its CPU kernels run (`cpu_isa`, `cpu_isa_quant`: after the MOLE_KERNELS_CPU_ISA cap)."""
    info = json.loads(ops.build_info())
    info["torch_runtime"] = torch.__version__
    info["cuda_runtime_available"] = torch.cuda.is_available()
    info["cpu_isa"], info["cpu_isa_quant"] = ops.cpu_isa("lut_gather"), ops.cpu_isa("lut_gather_quant")
    return info


def check_gather_args(fn: str, lut, ids, weights, out, accumulate, faults) -> None:
    """What the op schema cannot say about the public gathers' arguments: each is a dense tensor (or
    None) where one is meant, and ``accumulate`` a bool (``layer``: see :func:`layer_span`). The
    C++ plan checks shapes, dtypes, devices and memory overlap."""
    for name, t, optional in (("lut", lut, False), ("ids", ids, False), ("weights", weights, True),
                              ("out", out, True), ("faults", faults, True)):
        if not (isinstance(t, torch.Tensor) or (optional and t is None)):
            raise ValueError(f"{fn}: {name} must be a tensor{' or None' if optional else ''}, got {type(t).__name__}")
        if t is not None and t.layout != torch.strided:
            raise ValueError(f"{fn}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if not isinstance(accumulate, bool):
        raise ValueError(f"{fn}: accumulate must be a bool, got {accumulate!r}")


def raise_on_bad_ids(ids: torch.Tensor, V: int, where: str) -> None:
    """Raises ``ValueError`` naming the first id outside [0, V) (on a GPU this synchronises)."""
    bad = (ids < 0) | (ids >= V)
    if bool(bad.any()):
        pos = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(f"{where}: ids contains {int(ids.reshape(-1)[pos])} (at flat position {pos}), outside the "
                         f"table's vocabulary [0, {V})")


def layer_span(layer, L: int, where: str):
    """``layer`` as the ops take it: None, an int, or a slice of consecutive layers -> (layer, layer_end).

    A slice (rows form only) reads layers [start, stop) with one call, e.g. a prefetch that fills
    several layers of a buffer at once; negative or open ends follow Python's slice rules."""
    if layer is None or (isinstance(layer, int) and not isinstance(layer, bool)):
        return layer, None
    if isinstance(layer, slice):
        start, stop, step = layer.indices(L)
        if step != 1 or stop <= start:
            raise ValueError(f"{where}: layer slice {layer} must select consecutive layers (step 1) of the table's "
                             f"{L}, at least one")
        return start, stop
    raise ValueError(f"{where}: layer must be an int, a slice of layers or None, got {layer!r}")


def gather_shape(lut, ids, weights, layer, dim=None, layer_end=None):
    """The shape lut_gather returns (the C++ plan checks everything else). `dim`: the hidden size
    when the table's last axis is not it (a quantized table's last axis is bytes per row)."""
    torch._check(lut.dim() in (3, 4), lambda: f"lut_gather: lut must be [V, L, E, D] or [V, E, D], got {tuple(lut.shape)}")
    E, D = lut.shape[-2], lut.shape[-1] if dim is None else dim
    if weights is not None:
        return (*ids.shape, D)
    if layer_end is not None:
        return (*ids.shape, layer_end - layer, E, D)
    if layer is not None or lut.dim() == 3:
        return (*ids.shape, E, D)
    return (*ids.shape, lut.shape[1], E, D)


def check_fake_devices(op: str, lut, ids, **others):
    """The device rule of the C++ plan, for the fake kernels: they also run for real ``meta`` tensors,
    where all-meta inputs give a meta result, but a meta table with real ids (or real ids with a meta
    table) would return uninitialised memory: refused."""
    zero_copy = lut.device.type == "cpu" and ids.device.type == "cuda"
    torch._check_value(lut.device == ids.device or zero_copy,
                       lambda: f"{op}: ids must be on the table's device ({lut.device}) or on a CUDA device with a "
                               f"pinned CPU table, got ids on {ids.device}")
    for name, t in others.items():
        torch._check_value(t is None or t.device == ids.device,
                           lambda: f"{op}: {name} must be on ids' device ({ids.device}), got {t.device}")


@torch.library.register_fake("mole_kernels::lut_gather")
def _lut_gather_fake(lut, ids, weights=None, layer=None, layer_end=None):
    check_fake_devices("lut_gather", lut, ids, weights=weights)
    return ids.new_empty(gather_shape(lut, ids, weights, layer, layer_end=layer_end), dtype=lut.dtype)


@torch.library.register_fake("mole_kernels::lut_gather_out")
def _lut_gather_out_fake(out, lut, ids, weights=None, layer=None, accumulate=False, faults=None, layer_end=None):
    check_fake_devices("lut_gather", lut, ids, weights=weights, out=out, faults=faults)
    want = gather_shape(lut, ids, weights, layer, layer_end=layer_end)
    torch._check(tuple(out.shape) == tuple(want), lambda: f"lut_gather: out must have shape {want}")
    return None
