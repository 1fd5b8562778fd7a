import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
# spawned ranks import the tests package and megaslm from the repository
os.environ["PYTHONPATH"] = ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")

import pytest  # noqa: E402

_KERNEL_TESTS = os.path.join(ROOT, "tests", "kernels") + os.sep
_INHERITED_INTERPRET = os.environ.get("TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def _no_leaked_triton_interpret(request):
    """Outside tests/kernels, TRITON_INTERPRET is what the caller of pytest set, nothing more: a value left
    in the process environment reaches every launcher a test starts, which then runs the Triton kernels
    through the interpreter instead of the torch reference (minutes instead of seconds)."""
    if not str(request.node.fspath).startswith(_KERNEL_TESTS):
        assert os.environ.get("TRITON_INTERPRET") == _INHERITED_INTERPRET, \
            "TRITON_INTERPRET was left set by an earlier test (tests/kernels/conftest.py sets it per kernel test)"
    yield
