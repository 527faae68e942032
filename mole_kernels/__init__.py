"""mole_kernels: Mixture-of-Lookup-Experts inference with the lookup tables off the GPU."""
from ._ops import build_info
from .combine import lut_combine, mole_combine, router_softmax
from .lut_gather import lut_gather
from .quant import FORMATS, QuantizedLUT, dequantize, quantize
from .model import DenseForCausalLM, MoEForCausalLM, MoLEConfig, MoLEForCausalLM
from .table import LayerReader, LookupTable, Prefetch, Prefetcher, TableStats, host_allocations

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
__version__ = "0.1.0"
