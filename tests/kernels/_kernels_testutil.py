"""Shared helpers for kernel tests (imported after conftest has set TRITON_INTERPRET)."""
import os

import torch

if not torch.cuda.is_available():  # robust when a module is imported outside pytest's conftest
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def assert_close(actual, expected, atol, rtol, what=""):
    actual = actual.float()
    expected = expected.float()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
