"""Kernel tests: Triton kernels run under the CPU interpreter unless CUDA is present.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` function is decorated, i.e. when ``kernels.*`` is
imported, so it is set here, at conftest import, and the kernel modules are imported (or reloaded, if
another conftest imported them first) under it; then it is taken out of the process environment again and
set only while a kernel test runs, so that no other test's subprocesses inherit it.
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
_INTERPRET = not _CUDA or os.environ.get("KERNELS_TEST_INTERPRET") == "1"
if _INTERPRET:
    _before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("kernels.dispatch", "kernels.embedding", "kernels.attention", "kernels.doc_mask", "kernels"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])
    # every @triton.jit kernel is decorated now, under the interpreter ...
    import kernels.attention  # noqa: E402,F401
    import kernels.doc_mask  # noqa: E402,F401
    import kernels.embedding  # noqa: E402,F401
    # ... and the variable leaves the process environment again: set for the whole pytest process, every
    # subprocess that another test starts (training, eval and sweep launchers) inherited it and ran the
    # kernels through the interpreter (the eval launcher test took 3 minutes instead of 8 s). The kernel
    # tests get it back for their own duration (``_interpret`` below).
    if _before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _before

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (bf16/fp16 numerics of the compiled kernels)")


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """TRITON_INTERPRET=1 while a kernel test runs (``kernels.dispatch`` reads it at each call; the
    subprocesses these tests start need it too), and only then."""
    if _INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device():
    """Where the fp32 correctness tests run: the GPU when there is one, else CPU under the interpreter."""
    return "cpu" if _INTERPRET else "cuda"
