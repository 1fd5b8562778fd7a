"""The FlexAttention and SDPA backends (kernels/flex.py) and the rule that picks a backend (kernels/choice.py).

What CPU can show (FlexAttention has no backward on CPU): the BlockMask equals the dense document mask
element for element on odd layouts, flex's forward matches the fp32 reference, SDPA's forward and
gradients match it, the compiled flex_attention is not recompiled from batch to batch, and the ``auto``
rule with fake device names and planted result files.
"""
import json
import warnings

import pytest
import torch

from kernels.attention import segment_attention_reference
from kernels.bench.record import make_record, write_record
from kernels.choice import AttentionShape, choose_attention, gpu_attention_choice
from kernels.doc_mask import doc_positions_and_masks_reference
from kernels.flex import (document_block_mask, document_mask, flex_segment_attention,
                          sdpa_segment_attention)

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def dense_mask(seg):
    S = seg.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    return (seg[:, :, None] == seg[:, None, :]) & causal


def expand_block_mask(bm, seg, block):
    """The element mask a BlockMask makes flex compute: full blocks all True (no mask_mod), partial blocks
    through the mask_mod, every other block all False."""
    B, S = seg.shape
    out = torch.zeros(B, S, S, dtype=torch.bool)
    b_idx = torch.arange(B)[:, None, None]
    q_idx = torch.arange(S)[None, :, None]
    k_idx = torch.arange(S)[None, None, :]
    mod = bm.mask_mod(b_idx, 0, q_idx, k_idx)
    nq = bm.kv_num_blocks.shape[-1]
    for b in range(B):
        for qb in range(nq):
            rows = slice(qb * block, min(S, (qb + 1) * block))
            for i in range(int(bm.kv_num_blocks[b, 0, qb])):
                kb = int(bm.kv_indices[b, 0, qb, i])
                cols = slice(kb * block, min(S, (kb + 1) * block))
                out[b, rows, cols] = mod[b, rows, cols]
            for i in range(int(bm.full_kv_num_blocks[b, 0, qb])):
                kb = int(bm.full_kv_indices[b, 0, qb, i])
                cols = slice(kb * block, min(S, (kb + 1) * block))
                out[b, rows, cols] = True
    return out


def odd_layouts():
    """Segment ids [B, S] with the layouts that break block logic."""
    S = 80
    ones = torch.zeros(1, S, dtype=torch.int32)                       # a row with one document
    singles = torch.arange(S, dtype=torch.int32)[None]                # every document of length 1
    edges = torch.zeros(1, S, dtype=torch.int32)                      # documents crossing 16-blocks
    edges[0, 15:] = 1
    edges[0, 17:] = 2
    edges[0, 47:] = 3
    edges[0, 48:] = 4
    # tokens with eod (2) and a padded tail (0): segments as the data path makes them
    toks = torch.randint(5, 50, (3, S))
    toks[0, [9, 10, 40]] = 2
    toks[1, 60] = 2
    toks[1, 61:] = 0
    toks[2, 0] = 2
    _, seg_pad, _ = doc_positions_and_masks_reference(toks, eod_id=2, pad_id=0)
    return {"one-doc": ones, "length-1 docs": singles, "block edges": edges, "eod + padded tail": seg_pad}


@pytest.mark.parametrize("name", list(odd_layouts()))
@pytest.mark.parametrize("block", [16, 128])
def test_block_mask_equals_dense_document_mask(name, block):
    seg = odd_layouts()[name]
    bm = document_block_mask(seg, block_size=block)
    got = expand_block_mask(bm, seg, block)
    want = dense_mask(seg)
    assert torch.equal(got, want), (name, block, (got != want).nonzero()[:5])


def test_block_mask_is_built_once_per_batch():
    seg = torch.zeros(2, 64, dtype=torch.int32)
    assert document_block_mask(seg) is document_block_mask(seg)     # every layer of a step shares it
    assert document_mask(seg) is document_mask(seg)
    seg[0, 30:] = 1                                                  # an in-place change rebuilds it
    bm = document_block_mask(seg, block_size=16)
    assert torch.equal(expand_block_mask(bm, seg, 16), dense_mask(seg))


@pytest.mark.parametrize("hq,hkv,S,D", [(4, 2, 80, 16), (6, 1, 130, 32), (2, 2, 33, 8)])
def test_flex_and_sdpa_forward_match_reference(hq, hkv, S, D):
    g = torch.Generator().manual_seed(S)
    B = 3
    q = torch.randn(B, S, hq, D, generator=g)
    k = torch.randn(B, S, hkv, D, generator=g)
    v = torch.randn(B, S, hkv, D, generator=g)
    seg = torch.cumsum((torch.rand(B, S, generator=g) < 0.08).int(), 1).to(torch.int32)
    want = segment_attention_reference(q, k, v, seg, softmax_scale=0.3)
    with torch.no_grad():
        flex = flex_segment_attention(q, k, v, seg, softmax_scale=0.3)
    assert torch.allclose(flex, want, atol=2e-6, rtol=1e-5), float((flex - want).abs().max())
    sdpa = sdpa_segment_attention(q, k, v, seg, softmax_scale=0.3)
    assert torch.allclose(sdpa, want, atol=2e-6, rtol=1e-5), float((sdpa - want).abs().max())


def test_sdpa_gradients_match_reference():
    g = torch.Generator().manual_seed(0)
    B, S, hq, hkv, D = 2, 50, 4, 2, 16
    mk = lambda h: torch.randn(B, S, h, D, generator=g).requires_grad_(True)  # noqa: E731
    q, k, v = mk(hq), mk(hkv), mk(hkv)
    go = torch.randn(B, S, hq, D, generator=g)
    seg = odd_layouts()["eod + padded tail"][:2, :S].contiguous()
    a = torch.autograd.grad(sdpa_segment_attention(q, k, v, seg), (q, k, v), go)
    b = torch.autograd.grad(segment_attention_reference(q, k, v, seg), (q, k, v), go)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4)


def test_flex_refuses_cpu_backward_in_one_line():
    q = torch.randn(1, 8, 2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        flex_segment_attention(q, q.detach(), q.detach(), torch.zeros(1, 8, dtype=torch.int32))


def test_compiled_flex_is_not_recompiled_from_batch_to_batch():
    """One graph for every batch of one shape (the BlockMask's tensors and the mask_mod's closed-over segment
    ids are guarded by shape, not value); a new shape compiles once more."""
    from torch.nn.attention.flex_attention import flex_attention

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(flex_attention, backend=counting_backend, dynamic=False)
    g = torch.Generator().manual_seed(1)

    def batch(B, S):
        q = torch.randn(B, S, 4, 16, generator=g)
        kv = torch.randn(B, S, 2, 16, generator=g)
        seg = torch.sort(torch.randint(0, 4, (B, S), generator=g), dim=1).values.to(torch.int32)
        return q, kv, seg

    with torch.no_grad():
        for _ in range(3):
            q, kv, seg = batch(2, 96)
            out = flex_segment_attention(q, kv, kv, seg, fn=compiled)
            assert torch.allclose(out, segment_attention_reference(q, kv, kv, seg), atol=2e-6)
        assert len(graphs) == 1
        q, kv, seg = batch(2, 64)
        flex_segment_attention(q, kv, kv, seg, fn=compiled)
        assert len(graphs) == 2


# ------------------------------------------------------------------------------------------------
# the auto rule
# ------------------------------------------------------------------------------------------------
H100 = "NVIDIA H100 80GB HBM3"
SHAPE = AttentionShape("bf16", 64, 32, 8, 2048)


def plant(tmp_path, name, device, rows, dry_run=False):
    """A bench_attention record (kernels/bench/record.py) as a GPU run would store it."""
    rec = make_record("bench_attention", device, {"rows": rows}, command="python -m kernels.bench.bench_attention",
                      commit="abc", date="2026-12-03T00:00:00Z", dry_run=dry_run)
    write_record(rec, tmp_path / name)


def row(ratio, status="ok", S=2048, D=64, hq=32, hkv=8, dtype="bfloat16", kernel="attention_fwd_bwd"):
    return {"kernel": kernel, "impl": "triton", "dtype": dtype, "status": status, "ratio_vs_flex": ratio,
            "shape": {"B": 4, "S": S, "Hq": hq, "Hkv": hkv, "D": D}}


def test_auto_is_flex_without_a_stored_result(tmp_path):
    backend, reason = choose_attention("auto", True, H100, SHAPE, tmp_path)
    assert backend == "flex" and reason.startswith(f"triton not yet measured on {H100}")


def test_auto_promotes_triton_only_when_it_passed_and_beat_flex_on_this_shape(tmp_path):
    plant(tmp_path, "h100-2026-12-01-attention.json", H100, [row(1.21)])
    backend, reason = gpu_attention_choice(H100, SHAPE, tmp_path)
    assert backend == "triton" and "1.21x" in reason
    # same GQA ratio (4) with other head counts: the same shape class
    assert gpu_attention_choice(H100, AttentionShape("bf16", 64, 16, 4, 2048), tmp_path)[0] == "triton"
    # another device class, dtype, head dim, sequence length: not measured
    for other in (gpu_attention_choice("NVIDIA A100-SXM4-80GB", SHAPE, tmp_path),
                  gpu_attention_choice(H100, SHAPE._replace(dtype="fp16"), tmp_path),
                  gpu_attention_choice(H100, SHAPE._replace(head_dim=128), tmp_path),
                  gpu_attention_choice(H100, SHAPE._replace(seq_len=8192), tmp_path)):
        assert other[0] == "flex" and "not yet measured" in other[1]


def test_auto_keeps_flex_when_triton_is_slower_or_wrong(tmp_path):
    plant(tmp_path, "a-2026-12-01-attention.json", H100, [row(0.93)])
    backend, reason = gpu_attention_choice(H100, SHAPE, tmp_path)
    assert backend == "flex" and "0.93x" in reason
    plant(tmp_path, "b-2026-12-02-attention.json", H100, [row(None, status="mismatch dq: max abs err 0.3")])
    backend, reason = gpu_attention_choice(H100, SHAPE, tmp_path)
    assert backend == "flex" and "failed its numerics check" in reason


def test_auto_ignores_dry_runs_forward_rows_and_unreadable_files(tmp_path):
    plant(tmp_path, "dry.json", H100, [row(3.0)], dry_run=True)
    plant(tmp_path, "fwd.json", H100, [row(3.0, kernel="attention_fwd")])
    (tmp_path / "broken.json").write_text("{not json")
    assert gpu_attention_choice(H100, SHAPE, tmp_path)[0] == "flex"


def test_explicit_backends_and_cpu():
    assert choose_attention("reference", True, H100, SHAPE)[0] == "reference"
    assert choose_attention("triton", False, "cpu", SHAPE)[0] == "triton"
    assert choose_attention("auto", False, "cpu", SHAPE)[0] == "sdpa"
    with pytest.raises(ValueError):
        choose_attention("fast", True, H100, SHAPE)


def test_the_attention_bench_stores_what_the_rule_reads(tmp_path):
    """bench_attention's rows carry the structured shape the rule matches on (a dry run on CPU)."""
    import subprocess
    import sys

    from tests.kernels.conftest import _ROOT

    subprocess.run([sys.executable, "-m", "kernels.bench.bench_attention", "--dry-run", "--out", str(tmp_path)],
                   cwd=_ROOT, check=True, capture_output=True, env={**__import__("os").environ, "TRITON_INTERPRET": "1"},
                   timeout=300)
    [path] = tmp_path.glob("*.json")
    payload = json.loads(path.read_text())
    tri = [r for r in payload["figures"]["rows"] if r["impl"] == "triton" and r["kernel"] == "attention_fwd_bwd"]
    assert tri and set(tri[0]["shape"]) >= {"B", "S", "Hq", "Hkv", "D"}
    s = tri[0]["shape"]
    # the same file, as if a GPU had written it: the rule finds the row
    payload.update(device="Planted GPU", dry_run=False)
    tri[0].update(status="ok", ratio_vs_flex=1.5)
    path.write_text(json.dumps(payload))
    shape = AttentionShape(tri[0]["dtype"], s["D"], s["Hq"], s["Hkv"], s["S"])
    assert gpu_attention_choice("Planted GPU", shape, tmp_path)[0] == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention's backward is GPU-only)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,D", [(14, 2, 64), (32, 8, 64), (16, 4, 128)])
def test_compiled_flex_forward_backward_on_gpu(dtype, hq, hkv, D):
    """The GPU default: compiled FlexAttention's output and every gradient vs the fp32 reference."""
    g = torch.Generator().manual_seed(D)
    B, S = 2, 1024
    mk = lambda h: (torch.randn(B, S, h, D, generator=g) * 0.5).cuda().to(dtype).requires_grad_(True)  # noqa: E731
    q, k, v = mk(hq), mk(hkv), mk(hkv)
    go = torch.randn(B, S, hq, D, generator=g).cuda().to(dtype)
    seg = torch.cumsum((torch.rand(B, S, generator=g) < 0.01).int(), 1).to(torch.int32).cuda()
    got = (flex_segment_attention(q, k, v, seg),)
    got += torch.autograd.grad(got[0], (q, k, v), go)
    ref = (segment_attention_reference(q, k, v, seg).float(),)
    ref += torch.autograd.grad(ref[0], (q, k, v), go.float())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2, msg=lambda m: f"{name}: {m}")
