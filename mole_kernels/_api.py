"""The public API, imported by ``mole_kernels/__init__.py`` (see there for why it lives here).

Every name imported here is public: ``__init__`` re-exports them all (its ``__all__`` lists them).
"""
# ruff: noqa: F401
from ._ops import build_info
from .combine import lut_combine, mole_combine, router_softmax
from .lut_gather import lut_gather
from .quant import FORMATS, QuantizedLUT, dequantize, quantize
from .model import DenseForCausalLM, MoEForCausalLM, MoLEConfig, MoLEForCausalLM
from .table import LayerReader, LookupTable, Prefetch, Prefetcher, TableStats, host_allocations
