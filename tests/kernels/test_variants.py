"""The variant axes in kernels/dispatch.py (what the compile check compiles) cover every preset."""
from pathlib import Path

import pytest
import torch
import yaml

from kernels import dispatch

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_presets_found():
    assert {p.stem for p in PRESETS} >= {"tiny", "qwen2-360m", "llama3.2-1b"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_shapes_are_compile_checked(preset):
    """What a preset launches on a GPU must be compile-checked: the Triton attention only where the preset opts
    in (auto runs FlexAttention until a stored measurement promotes Triton: kernels/choice.py), the Triton
    embedding unless the preset names the reference or megatron's lookup."""
    m = yaml.safe_load(preset.read_text())["model"]
    head_dim = m.get("kv_channels") or m["hidden_size"] // m["num_attention_heads"]
    group = m["num_attention_heads"] // m.get("num_query_groups", m["num_attention_heads"])
    if m.get("attention_backend", "auto") in ("auto", "triton"):
        assert head_dim in dispatch.HEAD_DIMS, f"{preset.name}: head dim {head_dim} not in dispatch.HEAD_DIMS"
    if m.get("attention_backend", "auto") == "triton" or preset.stem in ("tiny", "qwen2-360m", "llama3.2-1b"):
        assert group in dispatch.GQA_GROUPS, f"{preset.name}: GQA ratio {group} not in dispatch.GQA_GROUPS"
    if m.get("embedding_backend", "auto") in ("auto", "triton"):
        assert m["hidden_size"] in dispatch.HIDDEN_SIZES, f"{preset.name}: hidden {m['hidden_size']} not covered"


@pytest.mark.parametrize("arch", dispatch.ARCHS)
def test_attention_spaces(arch):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for D in dispatch.HEAD_DIMS:
            tuned = str(dtype)[6:] in dispatch.TUNED_DTYPES and D in dispatch.TUNED_HEAD_DIMS
            fwd = dispatch.attention_space("fwd", arch, D, dtype)
            bwd = dispatch.attention_space("bwd", arch, D, dtype)
            det = dispatch.attention_space("bwd", arch, D, dtype, deterministic=True)
            assert len(fwd) == len(bwd) == (3 if tuned else 1)
            assert len({tuple(sorted(c.items())) for c in bwd}) == len(bwd)  # no duplicates to time
            assert det == [dict(bwd[0], ATOMIC_DQ=False)]  # deterministic: default blocks, no atomics
            if not tuned:  # untuned classes launch the deterministic kernels either way
                assert bwd == det
            for c in fwd + bwd:
                assert c["BLOCK_M"] >= 16 and c["BLOCK_N"] >= 16 and c["num_warps"] in (4, 8)
