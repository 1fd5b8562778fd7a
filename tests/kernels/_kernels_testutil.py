"""Shared helpers for kernel tests (the kernels run under the interpreter: tests/kernels/conftest.py)."""

import pytest
import torch

gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def assert_close(actual, expected, atol, rtol, what=""):
    actual = actual.float()
    expected = expected.float()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
