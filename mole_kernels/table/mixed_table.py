"""`MixedLookupTable`: a mixed-precision table (:class:`~mole_kernels.mixed.MixedLUT`) as a model's table.

Host tier on a CPU: the parts stay in RAM as they are (packed bytes, factored rows and bases) and a
decode step calls one C++ function per layer (``mole_kernels._C._lut_combine_mixed``: router logits,
softmax, each token's rows decoded by its part's format, the expert sum, residual and shared), the
same arithmetic as ``torch.ops.mole_kernels.lut_combine_mixed``, which torch.compile and dispatch
modes see instead. A model takes it like a :class:`~mole_kernels.table.LookupTable`::

    m = quantize_mixed(lut, counts, [("int8", 64), ("f36x5", None)], normalize=True)
    model.set_lut(MixedLookupTable(m))          # or MixedLookupTable.open("lut.safetensors") (save_mixed's file)

The disk tier is not built yet (each part's rows of a step read from the file): ``placement`` is "host".
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch

from .. import _C
from .._ops import ops
from ..mixed import MixedLUT, load_mixed, mixed_lut_gather, mixed_op_args
from .reader import _plain_eager, _router_logits

__all__ = ["MixedLookupTable"]


class MixedLookupTable:
    """A :class:`MixedLUT` ``[V, L, E, D]`` on the host tier of a CPU, read by one fused call per layer."""

    placement = "host"

    def __init__(self, m: MixedLUT):
        if not isinstance(m, MixedLUT):
            raise ValueError(f"MixedLookupTable: expected a MixedLUT, got {type(m).__name__}")
        if len(m.shape) != 4:
            raise ValueError(f"MixedLookupTable: the table must be [V, L, E, D], got {list(m.shape)}")
        parts = [getattr(p, "data", p) for p in m.parts]
        if any(t.device.type != "cpu" for t in (m.rank, *parts)):
            raise ValueError("MixedLookupTable: the mixed table must be on the CPU (the host tier of a CPU)")
        self.lut = m
        self._head, self._norm = mixed_op_args(m)
        self._handle = _C._mixed_table(*self._head, *self._norm)  # checked once; the step's call takes it as is

    @classmethod
    def open(cls, path) -> "MixedLookupTable":
        """A table file written by :func:`mole_kernels.mixed.save_mixed`, loaded into RAM."""
        return cls(load_mixed(path))

    @property
    def shape(self):
        return self.lut.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.lut.dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def format(self) -> str:
        return "mixed"

    @property
    def nbytes(self) -> int:
        return self.lut.nbytes

    @property
    def bits_per_value(self) -> float:
        return self.lut.bits_per_value

    def __repr__(self):
        return f"MixedLookupTable({self.lut.describe()}, shape={list(self.shape)}, {self.bits_per_value:.3f} bits/value)"

    def gather(self, ids: torch.Tensor, *, layer: Optional[int] = None) -> torch.Tensor:
        """Rows ``[*, L, E, D]`` (``[*, E, D]`` for one layer) in the table's dtype."""
        return mixed_lut_gather(self.lut, ids, layer=layer)

    def gather_combine(self, ids: torch.Tensor, weights: torch.Tensor, layer: int) -> torch.Tensor:
        """``sum_e weights[..., e] * row[..., layer, e, :]`` (float32 accumulation, the table's dtype)."""
        return mixed_lut_gather(self.lut, ids, weights, layer=layer)

    def reader(self) -> "MixedReader":
        return MixedReader(self)


class MixedReader:
    """A model's steps over a :class:`MixedLookupTable` (as :class:`~mole_kernels.table.LayerReader`)."""

    faults = 0  # ids are checked by every call (a bad id raises, naming it)

    def __init__(self, table: MixedLookupTable):
        self.table = table

    def start(self, ids: torch.Tensor) -> Callable[..., torch.Tensor]:
        """The step's layers' call ``combine(l, x, residual, shared, router_weight=None)``."""
        if _plain_eager(ids):  # eager inference: the C++ function itself, per layer
            return partial(_C._lut_combine_mixed, self.table._handle, ids)
        return partial(_op_combine_mixed, self.table, ids)  # torch.compile, dispatch modes, autograd: the op


def _op_combine_mixed(table: MixedLookupTable, ids, l, x, residual, shared, router_weight=None):
    logits = x if router_weight is None else _router_logits(x, router_weight)
    return ops.lut_combine_mixed(*table._head, ids, logits, l, *table._norm, residual, shared)
