"""Pipeline schedules: how many micro-batches each stage holds in flight (torch-free; ``megaslm.memory`` sizes
activations with it). The order replayed is megatron-core's own (``get_schedule_table``,
``get_pp_rank_microbatches``), checked against it in tests/test_memory_plan.py."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple


def _schedule_table(M: int, vpp: int, group: int) -> List[Tuple[int, int]]:
    """megatron-core's ``get_schedule_table``: (micro-batch, model chunk) in forward order."""
    out = []
    for lo in range(0, M, group):
        hi = M if lo + group >= M else lo + group
        out += [(mb, c) for c in range(vpp) for mb in range(lo, hi)]
    return out


def warmup_microbatches(pp: int, rank: int, M: int, vpp: Optional[int]) -> int:
    """megatron-core's warm-up count (``get_pp_rank_microbatches``), in model-chunk micro-batches."""
    if pp == 1:
        return 0
    total = M * (vpp or 1)
    w = pp - rank - 1 if vpp is None else (pp - rank - 1) * 2 + (vpp - 1) * pp
    return min(w, total)


def in_flight(pp: int, rank: int, M: int, vpp: Optional[int], chunk_bytes: Sequence[int]) -> Tuple[int, int]:
    """(peak bytes, model-chunk micro-batches in flight at it) of stage ``rank``, replaying megatron's
    order: warm-up forwards, then one forward and one backward at a time, then the cool-down backwards.
    ``chunk_bytes[c]``: one micro-batch of this rank's chunk c."""
    if pp == 1:
        return max(chunk_bytes), 1
    v = vpp or 1
    total = M * v
    table = _schedule_table(M, v, pp) if vpp else [(mb, 0) for mb in range(M)]
    w = warmup_microbatches(pp, rank, M, vpp)
    live, count, peak, peak_n = 0, 0, 0, 0
    f = bw = 0

    def forward():
        nonlocal live, count, peak, peak_n, f
        live += chunk_bytes[table[f][1]]
        count += 1
        f += 1
        if live > peak or (live == peak and count > peak_n):
            peak, peak_n = live, count

    def backward():
        nonlocal live, count, bw
        live -= chunk_bytes[v - 1 - table[bw][1]]
        count -= 1
        bw += 1

    for _ in range(w):
        forward()
    for _ in range(total - w):
        forward()
        backward()
    return peak, peak_n
