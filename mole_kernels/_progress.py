"""One progress bar for long table operations: tqdm when it is importable, else a no-op.

``progress_bar(total, desc, enabled=..., unit=...)`` returns an object with ``update(n)`` and
``close()`` (and usable as a context manager) either way, so callers never test for tqdm.
Bars go to stderr and disappear when closed (``leave=False``), and are drawn only when stderr is
a terminal: redrawn bars in a log file, a pipe or a CI log would be a flood of lines.
"""
from __future__ import annotations

import sys

__all__ = ["progress_bar"]


class _NullBar:
    """The interface of a tqdm bar that callers use, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _on_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(total: int, desc: str, *, enabled: bool = True, unit: str = "it", unit_scale: bool = False):
    """A tqdm bar over ``total`` units when ``enabled``, stderr is a terminal and tqdm is installed,
    else a no-op bar."""
    if enabled and _on_terminal(sys.stderr):
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr, leave=False)
    return _NullBar()
