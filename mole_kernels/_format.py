"""Number formatting shared by the command and its demos (no torch import: the command stays light)."""
from __future__ import annotations

from typing import Optional

__all__ = ["human_bytes"]


def human_bytes(n: Optional[float]) -> str:
    """``1536`` -> ``'1.5 KiB'``; None -> ``'-'`` (a figure that does not apply)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
