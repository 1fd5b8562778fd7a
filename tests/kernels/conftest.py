"""Kernel tests: Triton kernels run under the CPU interpreter unless CUDA is present.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is decorated, i.e. when ``kernels.*`` is
imported, so it is set here, at conftest import, before any test module imports triton.  If the kernel
modules were already imported (another conftest / test package imported them first) they are reloaded.
On a CUDA machine the same tests run the compiled kernels on the GPU (set KERNELS_TEST_INTERPRET=1 to
force the interpreter there too).
"""
import importlib
import os
import sys
from pathlib import Path

import torch

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # the repository root, so `import kernels` works under plain `pytest`
    sys.path.insert(0, _ROOT)

_CUDA = torch.cuda.is_available()
if not _CUDA or os.environ.get("KERNELS_TEST_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("kernels.dispatch", "kernels.embedding", "kernels.attention", "kernels.doc_mask", "kernels"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (bf16/fp16 numerics of the compiled kernels)")


@pytest.fixture(scope="session")
def device():
    """Where the fp32 correctness tests run: the GPU when there is one, else CPU under the interpreter."""
    return "cuda" if _CUDA and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
