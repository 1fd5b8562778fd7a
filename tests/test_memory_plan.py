"""megaslm/memory.py: the activation term against the bytes the real model saves for backward (CPU, fp32),
the pipeline schedules against megatron-core's own, the byte model, and the launchers that use the plan."""
import os
import subprocess
import sys

import pytest

from megaslm.config_io import load_config
from megaslm.memory import GIB, chunk_activations, gpu_memory_gib, plan, stage_parameters
from megaslm.pp_schedule import in_flight, warmup_microbatches
from tests.distributed import run_ranks
from tests.memory_workers import BASE, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

MODES = {
    "none": [],
    "selective": ["model.recompute=selective"],
    "selective+mlp": ["model.recompute=selective", "model.recompute_modules=[core_attn,mlp]"],
    "full uniform 1": ["model.recompute=full"],
    "full uniform 2": ["model.recompute=full", "model.recompute_num_layers=2"],
    "full block 2": ["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=2"],
}
BACKENDS = ("sdpa", "reference")


def _cases(prefix):
    return [(f"{' '.join(prefix) or 'TP 1'} | {b} | {mode}", prefix + [f"model.attention_backend={b}"] + ovs)
            for b in BACKENDS for mode, ovs in MODES.items()]


TP1 = _cases([])
TP2 = _cases(["parallel.tensor=2"]) + _cases(["parallel.tensor=2", "parallel.sequence_parallel=true"])
PP2 = [("PP 2 | sdpa | none", ["parallel.pipeline=2"]),
       ("PP 2 | sdpa | full uniform 1", ["parallel.pipeline=2", "model.recompute=full"])]


@pytest.fixture(scope="module")
def counted():
    """One spawned group per world size evaluates every case (a launch costs seconds on 2 cores)."""
    one = run_ranks(1, "tests.memory_workers:count_cases", [ovs for _, ovs in TP1])[0]
    two = run_ranks(2, "tests.memory_workers:count_cases", [ovs for _, ovs in TP2 + PP2])
    rows = {}
    for (name, _), r in zip(TP1, one):
        rows[name] = [r]
    for (name, _), r0, r1 in zip(TP2 + PP2, *two):
        rows[name] = [r0, r1]
    return rows


def _estimate(ovs, first=True, last=True):
    cfg = load_config(TINY, BASE + list(ovs))
    return sum(chunk_activations(cfg, cuda=False, first=first, last=last).values())


def test_activation_estimate_matches_the_saved_bytes(counted):
    """Every recompute mode, TP 1 and 2, sequence parallelism on and off, sdpa and reference: within 10%
    (the model is per op: it should be, and is, much closer)."""
    lines, worst = [], 0.0
    for name, ovs in TP1 + TP2 + PP2:
        for i, r in enumerate(counted[name]):
            est = _estimate(ovs, r["first"], r["last"])
            err = (est - r["counted"]) / r["counted"]
            worst = max(worst, abs(err))
            assert abs(err) <= 0.10, f"{name} (rank {i}): estimate {est:,} B, counted {r['counted']:,} B ({err:+.2%})"
            if "PP" in name or i == 0:   # TP ranks hold the same: one line for both (asserted above each)
                where = f" (pp stage {r['pp_rank']})" if "PP" in name else ""
                lines.append(f"| {name}{where} | {est:,} | {r['counted']:,} | {err:+.2%} |")
    print("\n| case | estimate (B) | counted (B) | error |\n|---|---|---|---|\n" + "\n".join(lines)
          + f"\nworst relative error {worst:.3%}")


def test_cpu_backend_is_the_models(counted):
    """The plan's CPU backend rule gives what megaslm.model.resolve_attention resolved in the ranks."""
    for name, ovs in TP1:
        assert counted[name][0]["attention"] == name.split(" | ")[1]
    from megaslm.memory import attention_backend
    assert attention_backend(load_config(TINY), cuda=False) == "sdpa"
    assert attention_backend(load_config(TINY), cuda=True) == "flex"


def test_recompute_reduces_the_counted_bytes(counted):
    for prefix in ("TP 1", "parallel.tensor=2", "parallel.tensor=2 parallel.sequence_parallel=true"):
        c = {mode: counted[f"{prefix} | reference | {mode}"][0]["counted"] for mode in MODES}
        assert c["selective"] < c["none"], (prefix, c)
        assert c["full uniform 1"] < c["selective"], (prefix, c)
        assert c["full uniform 2"] < c["full uniform 1"] and c["full block 2"] < c["none"], (prefix, c)
    # sequence parallelism divides what lives outside the TP regions
    none_tp2 = counted["parallel.tensor=2 | sdpa | none"][0]["counted"]
    assert counted["parallel.tensor=2 parallel.sequence_parallel=true | sdpa | none"][0]["counted"] < none_tp2


def test_parameter_count_per_stage_is_the_built_models(counted):
    for name, ovs in TP1[:1] + TP2[:1] + PP2[:1]:
        cfg = load_config(TINY, BASE + list(ovs))
        per_stage = stage_parameters(cfg)
        for r in counted[name]:
            assert r["params"] == per_stage[r["pp_rank"]], (name, r, per_stage)
    assert stage_parameters(load_config(TINY))[0] == load_config(TINY).num_parameters()


@pytest.mark.parametrize("pp,vpp,M", [(2, None, 4), (4, None, 3), (2, 2, 4), (4, 2, 8), (4, 3, 4), (3, 2, 6)])
def test_schedule_matches_megatron(pp, vpp, M):
    """The warm-up counts and the interleaved order are megatron-core's own."""
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches, get_schedule_table

    from megaslm.pp_schedule import _schedule_table

    class Group:
        def __init__(self, rank):
            self._rank = rank

        def size(self):
            return pp

        def rank(self):
            return self._rank

    class P2P:
        def __init__(self, rank):
            self.pp_group = Group(rank)
            self.virtual_pipeline_model_parallel_size = vpp

    for rank in range(pp):
        _, _, warm, _ = get_pp_rank_microbatches(M, vpp or 1, pp, p2p_communicator=P2P(rank))
        assert warmup_microbatches(pp, rank, M, vpp) == warm
        if vpp is None:   # 1F1B: stage i holds min(pp - i, M) micro-batches
            assert in_flight(pp, rank, M, None, [1]) == (min(pp - rank, M), min(pp - rank, M))
        else:             # warm-up + 1, capped by the total
            assert in_flight(pp, rank, M, vpp, [1] * vpp)[1] == min(warm + 1, M * vpp)
    if vpp:
        assert _schedule_table(M, vpp, pp) == get_schedule_table(M, vpp, pp)


def test_byte_model_of_the_optimizer():
    """bf16: 2 + 2 + 12/dp from ZeRO-1 on, grads / dp from ZeRO-2, params / dp at ZeRO-3; fp32 ZeRO-0: 4 + 4 + 8."""
    from megaslm.memory import _optimizer_bytes

    n, dp = 1000, 4
    assert _optimizer_bytes("bf16", 0, n, dp)[:3] == (2 * n, 2 * n, 12 * n)
    assert _optimizer_bytes("bf16", 1, n, dp)[:3] == (2 * n, 2 * n, 12 * n // dp)
    assert _optimizer_bytes("bf16", 2, n, dp)[:3] == (2 * n, 2 * n // dp, 12 * n // dp)
    assert _optimizer_bytes("bf16", 3, n, dp)[:3] == (2 * n // dp, 2 * n // dp, 12 * n // dp)
    assert _optimizer_bytes("fp32", 0, n, dp)[:3] == (4 * n, 4 * n, 8 * n)
    assert _optimizer_bytes("fp32", 1, n, dp)[:3] == (4 * n, 4 * n, 12 * n // dp)   # DeepSpeed's master clone


def test_plan_of_the_8b_preset():
    cfg = load_config(os.path.join(ROOT, "configs", "llama3.1-8b.yaml"))
    p = plan(cfg, 8, gpu_memory_gib=40)
    assert (p.precision, p.attention, p.data) == ("bf16", "flex", 8)
    w = p.worst
    n = cfg.num_parameters()
    assert w.params == n and w.parameters == 2 * n and w.optimizer == 12 * -(-n // 8)
    assert not p.fits and w.total > 40 * GIB
    assert any(part == "activations" and ov == "model.recompute=full" for part, ov, _ in p.levers)
    # recompute, TP and sequence parallelism each shrink the activations
    levers = {"none": [], "full": ["model.recompute=full"], "tp2": ["parallel.tensor=2"],
              "tp2sp": ["parallel.tensor=2", "parallel.sequence_parallel=true"]}
    a = {k: plan(load_config(os.path.join(ROOT, "configs", "llama3.1-8b.yaml"), ovs), 8).worst.activations
         for k, ovs in levers.items()}
    assert a["full"] < a["none"] and a["tp2sp"] < a["tp2"] < a["none"]
    # 1F1B: the first stage holds the most micro-batches
    pp = plan(load_config(os.path.join(ROOT, "configs", "llama3.1-8b.yaml"), ["parallel.pipeline=4"]), 8)
    assert [s.in_flight for s in pp.stages] == [4, 3, 2, 1]
    assert [s.rank for s in pp.stages] == [0, 2, 4, 6]


def test_known_gpus():
    assert gpu_memory_gib("one H100 (assumed, bf16)") == 80
    assert gpu_memory_gib("NVIDIA H200") == 141
    assert gpu_memory_gib("A100-SXM4-40GB") == 40 and gpu_memory_gib("A100 80GB") == 80
    assert gpu_memory_gib("2 CPU cores") is None


def test_memory_module_is_torch_free():
    code = "import sys, megaslm.memory; print('torch' in sys.modules, 'megatron' in sys.modules)"
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def _dry(*args):
    return subprocess.run([PY, os.path.join(ROOT, "launchers", "pretrain.py"), "--config",
                           os.path.join(ROOT, "configs", "llama3.1-8b.yaml"), "--dry-run", "--world-size", "8", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_dry_run_refuses_what_does_not_fit():
    r = _dry("--gpu-memory", "40")
    assert r.returncode == 2, r.stdout + r.stderr
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1, r.stderr
    line = err[0]
    assert line.startswith("error: memory: rank 0 (pp stage 0) needs ") and " of 40 GiB (short " in line
    for lever in ("activations", "model.recompute=full", "parallel.sequence_parallel=true", "optimizer",
                  "parallel.zero_stage=2", "parallel.zero_stage=3"):
        assert lever in line, lever
    assert "memory per rank (GiB)" in r.stdout   # the table comes first


def test_dry_run_accepts_what_fits():
    r = _dry("--gpu-memory", "80", "parallel.tensor=8", "parallel.sequence_parallel=true", "model.recompute=full")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for row in ("parameters (bf16)", "gradients (bf16)", "optimizer (fp32 master + Adam m, v, ZeRO-1)",
                "activations", "in flight", "overhead (CUDA context, allocator)", "total"):
        assert row in out, row
    assert "of 80 GiB: fits" in out
    assert r.stderr.strip() == "" or "error" not in r.stderr
