"""``python -m mole_kernels demo|reparameterize|info`` (the same as the ``mole-kernels`` command)."""
import sys

from .cli import main

sys.exit(main())
