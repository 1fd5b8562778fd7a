"""Which document-masked attention a model runs when it asks for ``auto``: the rule, and its reason.

* On a GPU the default is PyTorch's FlexAttention (``flex``): a kernel PyTorch itself tests on GPUs.
  Our Triton kernel (``triton``) earns the default only by a stored, side-by-side measurement on this device
  class: a record of ``python -m kernels.bench.bench_attention`` (or ``bench_all``) in the results folder
  ``docs/bench/`` (kernels/bench/record.py: written on a GPU, committed with device, commit and date; not a
  dry run) whose Triton forward+backward row for this shape -- same
  dtype, head dim, query heads per KV head and sequence length -- passed the bench's numerics check against
  FlexAttention (status ``ok``: output and every gradient agree, else it is stored as ``mismatch ...`` and
  never timed) and ran faster than FlexAttention on the same mask (``ratio_vs_flex > 1``).
  ``reference`` (a dense fp32 score tensor) is never chosen on a GPU.
* On CPU: ``sdpa`` (``scaled_dot_product_attention`` with a boolean document mask), the fastest correct CPU
  training path measured by ``launchers/bench_trainer_cpu.py`` (README: Performance).  FlexAttention has no
  backward on CPU.

Imports only the standard library: the rule is a pure function of the device name, the shape and the result
records, so it is tested with fake device names and planted records (tests/kernels/test_flex.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Tuple

from kernels.bench.record import RESULTS_DIR, read_records

ATTENTION_BENCHMARKS = ("bench_attention", "bench_all")   # the records that carry attention rows
BACKENDS = ("flex", "sdpa", "triton", "reference")
_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class AttentionShape(NamedTuple):
    """What the stored measurement must match: dtype name, head dim, query heads, KV heads, sequence length."""
    dtype: str          # bfloat16 | float16 | float32 (or bf16 / fp16 / fp32)
    head_dim: int
    q_heads: int
    kv_heads: int
    seq_len: int

    @property
    def gqa(self) -> int:
        return self.q_heads // max(1, self.kv_heads)

    def describe(self) -> str:
        return (f"{_DTYPE_NAMES.get(self.dtype, self.dtype)} S={self.seq_len} D={self.head_dim} "
                f"heads {self.q_heads}/{self.kv_heads}")


def _stored_rows(results_dir: Path) -> Iterator[Tuple[str, dict, dict]]:
    """(file name, record, row) for every attention fwd+bwd Triton row of every stored attention record, oldest
    record first (unreadable files and other records are skipped)."""
    for path, rec in read_records(results_dir, ATTENTION_BENCHMARKS):
        for row in rec["figures"].get("rows") or []:
            if isinstance(row, dict) and row.get("kernel") == "attention_fwd_bwd" and row.get("impl") == "triton":
                yield path.name, rec, row


def _matches(row: dict, shape: AttentionShape) -> bool:
    s = row.get("shape") or {}
    try:
        return (row.get("dtype") == _DTYPE_NAMES.get(shape.dtype, shape.dtype)
                and int(s["D"]) == shape.head_dim and int(s["Hq"]) // max(1, int(s["Hkv"])) == shape.gqa
                and int(s["S"]) == shape.seq_len)
    except (KeyError, TypeError, ValueError):
        return False


def gpu_attention_choice(device_name: str, shape: AttentionShape,
                         results_dir: Optional[Path] = None) -> Tuple[str, str]:
    """(backend, reason) for ``auto`` on the CUDA device called ``device_name``."""
    results_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    found = [(f, r) for f, rec, r in _stored_rows(results_dir)
             if rec["device"] == device_name and not rec["dry_run"] and _matches(r, shape)]
    if not found:
        return "flex", f"triton not yet measured on {device_name} at {shape.describe()}"
    failed = [(f, r) for f, r in found if r.get("status") != "ok"]
    if failed:
        f, r = failed[-1]
        return "flex", f"triton failed its numerics check vs FlexAttention on {device_name} ({f}: {r.get('status')})"
    f, r = found[-1]                                # the newest record (by its date)
    ratio = r.get("ratio_vs_flex")
    if ratio is None:
        return "flex", f"triton measured on {device_name} without FlexAttention beside it ({f})"
    if float(ratio) > 1.0:
        return "triton", (f"triton passed its numerics check and ran fwd+bwd {float(ratio):.2f}x FlexAttention "
                          f"on {device_name} at {shape.describe()} ({f})")
    return "flex", (f"triton ran fwd+bwd at {float(ratio):.2f}x FlexAttention on {device_name} "
                    f"at {shape.describe()} ({f})")


def choose_attention(requested: str, cuda: bool, device_name: str, shape: AttentionShape,
                     results_dir: Optional[Path] = None) -> Tuple[str, str]:
    """The backend a model runs for ``model.attention_backend=requested``, and why (one line)."""
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"attention backend: expected auto or one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        return requested, "as configured (model.attention_backend)"
    if cuda:
        return gpu_attention_choice(device_name, shape, results_dir)
    return "sdpa", "CPU: SDPA with a boolean document mask, the fastest correct CPU training path"


def reference_score_bytes(micro_batch: int, q_heads_per_rank: int, seq_len: int, num_layers: int) -> int:
    """Bytes of [B, H, S, S] the dense reference keeps for backward: its fp32 probabilities, per layer (the masked
    scores are freed once softmax has run; megaslm/memory.py counts the rest of what it saves)."""
    return 4 * micro_batch * q_heads_per_rank * seq_len * seq_len * num_layers


def env_results_dir() -> Optional[Path]:
    """``MEGASLM_KERNEL_RESULTS`` overrides the results folder the rule reads (tests, a site's own results)."""
    d = os.environ.get("MEGASLM_KERNEL_RESULTS")
    return Path(d) if d else None
