"""The block-size autotuner's choice and its cache (the GPU timing itself needs a GPU: bench closures here)."""
import json

import pytest

from kernels import autotune


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGASLM_KERNEL_TUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.delenv("MEGASLM_KERNEL_TUNE", raising=False)
    monkeypatch.setattr(autotune, "_MEM", {})
    monkeypatch.setattr(autotune, "_FILE_LOADED", None)
    return tmp_path / "tune.json"


CFGS = [{"BLOCK_M": 128}, {"BLOCK_M": 64}, {"BLOCK_M": 32}]


def test_picks_fastest_skips_failing_and_caches(fresh, monkeypatch):
    calls = []

    def bench(cfg):
        calls.append(cfg["BLOCK_M"])
        if cfg["BLOCK_M"] == 32:
            raise RuntimeError("out of resources")
        return {128: 2.0, 64: 1.0}[cfg["BLOCK_M"]]

    assert autotune.choose("k", CFGS, bench) == {"BLOCK_M": 64}
    assert calls == [128, 64, 32]
    saved = json.loads(fresh.read_text())["k"]
    assert saved["config"] == {"BLOCK_M": 64} and saved["ms"][:2] == [2.0, 1.0]
    assert autotune.choose("k", CFGS, bench) == {"BLOCK_M": 64} and len(calls) == 3  # in-process cache
    # a new process reads the file instead of timing again
    monkeypatch.setattr(autotune, "_MEM", {})
    monkeypatch.setattr(autotune, "_FILE_LOADED", None)
    assert autotune.choose("k", CFGS, lambda c: 1 / 0) == {"BLOCK_M": 64}
    # a cached config no longer in the space is re-tuned
    assert autotune.choose("k", CFGS[:1] + CFGS[2:], lambda c: 3.0) == {"BLOCK_M": 128}


def test_disabled_or_single_config_takes_the_default(fresh, monkeypatch):
    assert autotune.choose("one", CFGS[1:2], lambda c: 1 / 0) == CFGS[1]
    monkeypatch.setenv("MEGASLM_KERNEL_TUNE", "0")
    assert autotune.choose("off", CFGS, lambda c: 1 / 0) == CFGS[0]
    assert not fresh.exists()


def test_nothing_runs_raises(fresh):
    with pytest.raises(RuntimeError, match="no config"):
        autotune.choose("bad", CFGS, lambda c: 1 / 0)
