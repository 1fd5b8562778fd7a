"""The CPU-compatibility layer: its patch targets still exist in the installed megatron-core."""
import pytest

from megaslm import cpu_compat


def test_patch_targets_present():
    cpu_compat.check_patch_targets()  # raises with the list of moved names after a megatron-core upgrade


def test_moved_name_fails_loudly(monkeypatch):
    monkeypatch.setitem(cpu_compat.PATCHED_MODULES, "megatron.core.utils", ["torch.cuda.this_was_moved()"])
    with pytest.raises(RuntimeError, match="megatron.core.utils: no longer contains"):
        cpu_compat.check_patch_targets()
    monkeypatch.setattr(cpu_compat, "RNG_NAMES", cpu_compat.RNG_NAMES + ["_NO_SUCH_TRACKER"])
    monkeypatch.setitem(cpu_compat.PATCHED_MODULES, "megatron.core.utils", [])
    with pytest.raises(RuntimeError, match="_NO_SUCH_TRACKER: missing"):
        cpu_compat.check_patch_targets()


def test_cpu_rng_tracker_forks_and_restores():
    import torch

    t = cpu_compat.CpuRNGStatesTracker()
    t.add("a", 123)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with t.fork("a"):
        x = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with t.fork("a"):
        y = torch.rand(3)
    assert not torch.equal(x, y)  # the forked stream advanced
    t2 = cpu_compat.CpuRNGStatesTracker()
    t2.add("a", 123)
    with t2.fork("a"):
        assert torch.equal(torch.rand(3), x)
