"""Shared test setup: every test starts from the same seed, CUDA tests skip cleanly."""
import random

import pytest
import torch

import mole_kernels  # noqa: F401  (an unbuilt or mismatched install fails here once, not in every module)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none visible)")

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerances for a float32-accumulated result rounded to the output dtype (half an ulp, with margin).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    yield
