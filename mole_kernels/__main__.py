"""``python -m mole_kernels demo|reparameterize|quality|info`` (the same as the ``mole-kernels`` command)."""
import sys

from .cli import main

sys.exit(main(prog="python -m mole_kernels"))
