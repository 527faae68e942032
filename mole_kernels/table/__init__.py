"""Where a LUT lives and how its rows get to where they are used.

- ``lookup_table.py``: :class:`LookupTable` (tiers, paths, gather, stats);
- ``reader.py``: :class:`LayerReader`, how a model's steps read a table (one fused call per layer);
- ``mixed_table.py``: :class:`MixedLookupTable`, a mixed-precision table (mole_kernels.mixed) as a model's table;
- ``prefetch.py``: :class:`Prefetcher`, all layers' rows for the next ids fetched ahead of use;
- ``file_format.py``: the table file (safetensors + metadata), validated on read, written atomically.

The C++ side (exact-size host memory, file reads, row copies, DMA) is
``torch.classes.mole_kernels.TableStore`` (csrc/lookup_table.cpp).
"""
from .file_format import FORMAT_VERSION
from .lookup_table import LookupTable, TableStats, host_allocations
from .prefetch import Prefetch, Prefetcher
from .reader import LayerReader
from .mixed_table import MixedLookupTable

__all__ = ["LayerReader", "LookupTable", "MixedLookupTable", "Prefetch", "Prefetcher", "TableStats", "host_allocations", "FORMAT_VERSION"]
