"""The plan of a sweep, before anything runs: per run its parameters, tokens per stage, steps, FLOPs,
device-hours at the spec's throughput, and the worst rank's memory (megaslm/memory.py) at the spec's
world size with whether it fits the GPU the spec names."""
from __future__ import annotations

from typing import Dict, List, Optional

from megaslm import memory  # torch-free: the per-rank memory plan of the fits column
from megaslm.config import RunConfig
from megaslm.config_io import _merge, config_from_dict
from megaslm.telemetry import flops_per_token
from megaslm.sweeps.expand import Sweep, preset_model
from megaslm.sweeps.spec import PRESETS, SweepError


def _human(n: float) -> str:
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def _reference_flops_per_token(sw: Sweep) -> float:
    t = sw.spec.throughput
    ref = next((r for r in sw.runs if r.size == t.reference), None)
    if ref is not None:
        return flops_per_token(ref.config)
    if t.reference in PRESETS:
        return flops_per_token(config_from_dict(_merge(RunConfig().to_dict(), {
            "model": preset_model(t.reference), "data": {"demo": True}})))
    raise SweepError(f"throughput.reference: {t.reference!r} is neither a size of this sweep nor a preset")


def plan_rows(sw: Sweep) -> List[Dict]:
    t = sw.spec.throughput
    ref_fpt = _reference_flops_per_token(sw)
    gpu = plan_gpu_memory(sw)
    rows = []
    for r in sw.runs:
        fpt = flops_per_token(r.config)
        # throughput in FLOPs/s is assumed constant across sizes (stated in the table footer)
        tok_s = t.tokens_per_s * ref_fpt / fpt
        # the worst rank's memory (megaslm/memory.py) on the spec's GPU; a CPU device: as run on CPU, no verdict
        mem = memory.plan(r.config, sw.spec.world_size, gpu, cuda=gpu is not None, levers=False)
        rows.append({"run": r.name, "params": r.config.num_parameters(), "stage_tokens": r.stage_tokens,
                     "tokens": r.tokens, "steps": r.config.total_steps(), "flops": r.flops(),
                     "device_hours": r.tokens / tok_s / 3600,  # tok_s is per device
                     "memory_gib": mem.worst.total / memory.GIB, "fits": mem.fits})
    return rows


def plan_gpu_memory(sw: Sweep) -> Optional[float]:
    """GiB per GPU the plan checks the runs against: ``throughput.gpu_memory_gib``, else the GPU its
    ``device`` names; None for a CPU device."""
    t = sw.spec.throughput
    return t.gpu_memory_gib if t.gpu_memory_gib is not None else memory.gpu_memory_gib(t.device)


def format_plan(sw: Sweep) -> str:
    rows = plan_rows(sw)
    gpu = plan_gpu_memory(sw)
    head = ["run", "params", "tokens per stage", "steps", "FLOPs", "device-h", "memory GiB",
            f"fits {gpu:g} GiB" if gpu is not None else "fits"]
    body = [[r["run"], f"{r['params']:,}", " + ".join(_human(x) for x in r["stage_tokens"]), f"{r['steps']:,}",
             f"{r['flops']:.3e}", f"{r['device_hours']:.3f}", f"{r['memory_gib']:.1f}",
             {None: "-", True: "yes", False: "NO"}[r["fits"]]] for r in rows]
    w = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(x)) for x in [head] + body]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + _plan_footer(sw, rows, gpu))


def _plan_footer(sw: Sweep, rows: List[Dict], gpu: Optional[float]) -> List[str]:
    t = sw.spec.throughput
    out = [f"{len(rows)} runs; matching: {sw.spec.matching} (every arm of one budget trains on exactly the "
           f"{'same tokens' if sw.spec.matching == 'tokens' else 'same FLOPs, 6N + 12LHS per token'}); "
           f"total {sum(r['flops'] for r in rows):.3e} FLOPs, {sum(r['device_hours'] for r in rows):.2f} "
           f"device-hours at {t.tokens_per_s:,.0f} tokens/s on {t.device} for {t.reference} "
           "(other sizes at the same FLOP/s)"]
    where = (f"against {gpu:g} GiB per GPU ({'throughput.gpu_memory_gib' if t.gpu_memory_gib is not None else t.device})"
             if gpu is not None else "as on CPU (no GPU named in throughput.device: no verdict)")
    short = sum(1 for r in rows if r["fits"] is False)
    out.append(f"memory: the worst rank of each run at world size {sw.spec.world_size} (megaslm/memory.py: parameters, "
               f"gradients, optimizer, activations in flight{', 1.5 GiB overhead' if gpu is not None else ''}) {where}"
               + (f"; {short} run{'s' if short != 1 else ''} do{'es' if short == 1 else ''} not fit: check one with "
                  "`launchers/pretrain.py --config <run config> --dry-run --world-size N --gpu-memory GIB` "
                  "for the levers" if short else ""))
    return out
