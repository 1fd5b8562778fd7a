"""Throughput, model FLOPs utilisation, GPU telemetry (nvidia-ml-py) and metric sinks (JSONL, TensorBoard).

MFU formula (PaLM appendix B, dense decoder, no activation recomputation counted)::

    flops_per_token = 6 * N  +  12 * L * H * S
    MFU             = flops_per_token * tokens_per_s / (world_size * peak_flops_per_device)

with N the parameter count of the whole model (all shards, embeddings included: with tied
embeddings the output projection's matmul is counted once through the shared matrix), L layers,
H = heads x head_dim (the attention width), S the sequence length: 6N for the forward+backward of
every weight matmul, 12 L H S for the attention score and value matmuls (forward 4 L H S, backward
twice that; no causal halving, as PaLM). Peak FLOP/s are the dense (non-sparse) tensor-core numbers
of the device for the run's precision; MFU is ``None`` where the peak is unknown (CPU, other GPUs).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from megaslm.fsutil import atomic_write_text

# dense tensor-core peak FLOP/s per device: (name fragment, precision) -> FLOP/s
PEAK_FLOPS = {
    ("H200", "bf16"): 989e12, ("H200", "fp16"): 989e12, ("H200", "fp32"): 494.5e12,  # fp32: TF32 dense
    ("H100", "bf16"): 989e12, ("H100", "fp16"): 989e12, ("H100", "fp32"): 494.5e12,  # SXM; PCIe is lower
    ("A100", "bf16"): 312e12, ("A100", "fp16"): 312e12, ("A100", "fp32"): 156e12,
}


def flops_per_token(cfg) -> float:
    m = cfg.model
    attn_width = cfg.head_dim * m.num_attention_heads
    return 6.0 * cfg.num_parameters() + 12.0 * m.num_layers * attn_width * m.seq_length


def peak_flops(device_name: Optional[str], precision: str) -> Optional[float]:
    if not device_name:
        return None
    up = device_name.upper()
    if "H100" in up and "PCIE" in up:
        return {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}.get(precision)
    for (frag, prec), val in PEAK_FLOPS.items():
        if frag in up and prec == precision:
            return val
    return None


def mfu(cfg, tokens_per_s: float, world_size: int, device_name: Optional[str], precision: str) -> Optional[float]:
    peak = peak_flops(device_name, precision)
    if peak is None or tokens_per_s <= 0:
        return None
    return flops_per_token(cfg) * tokens_per_s / (world_size * peak)


class GpuMonitor:
    """Memory, utilisation and power of this rank's GPU through NVML; disabled (no crash) without one."""

    def __init__(self, local_index: Optional[int] = None):
        self.handle = None
        self.name: Optional[str] = None
        try:
            import torch

            if not torch.cuda.is_available():
                return
            self.name = torch.cuda.get_device_name()
            import pynvml

            pynvml.nvmlInit()
            idx = torch.cuda.current_device() if local_index is None else local_index
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
            self.nvml = pynvml
        except Exception:  # pynvml.NVMLError, ImportError, driver trouble: no telemetry
            self.handle = None

    @property
    def enabled(self) -> bool:
        return self.handle is not None

    def read(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        try:
            import torch

            if torch.cuda.is_available():
                out["gpu_mem_allocated_gib"] = torch.cuda.memory_allocated() / 2 ** 30
                out["gpu_mem_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        except Exception:
            pass
        if self.handle is None:
            return out
        nv = self.nvml
        for key, fn in (
            ("gpu_mem_used_gib", lambda: nv.nvmlDeviceGetMemoryInfo(self.handle).used / 2 ** 30),
            ("gpu_util_pct", lambda: float(nv.nvmlDeviceGetUtilizationRates(self.handle).gpu)),
            ("gpu_power_w", lambda: nv.nvmlDeviceGetPowerUsage(self.handle) / 1000.0),
        ):
            try:
                out[key] = fn()
            except Exception:
                pass
        return out


def read_step_records(path: str, want=lambda rec: True) -> List[Dict]:
    """The records of a step-logged JSONL (metrics.jsonl, evals/results.jsonl) that ``want``, in step order,
    the last of each step (a resumed run logs the steps after its checkpoint again); a line torn by a kill is
    skipped; [] without the file."""
    by_step: Dict[int, Dict] = {}
    try:
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("step") is not None and want(rec):
                    by_step[rec["step"]] = rec
    except OSError:
        return []
    return [by_step[k] for k in sorted(by_step)]


def truncate_metrics(path: str, step: int) -> None:
    """Keep only the records of steps <= ``step`` in ``path`` (a resume from the checkpoint of
    ``step`` re-runs the later ones; they must not appear twice). Written to a temporary name and
    renamed, so a kill leaves either the old or the new file. A torn last line (a kill mid-write) goes."""
    if not os.path.exists(path):
        return
    keep = []
    changed = False
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                changed = True
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
                changed = True
                continue
            keep.append(line if line.endswith("\n") else line + "\n")
    if not changed:
        return
    atomic_write_text(path, "".join(keep))


def scalars(rec: Dict) -> Dict[str, float]:
    """A step (or evaluation) record's numbers under the names TensorBoard and wandb show:
    ``train/<key>`` for a top-level number, ``<key>/<subkey>`` for the numbers of a nested dict
    (``eval/...``, ``source_tokens/...``); the step itself, flags and text are left out."""
    out: Dict[str, float] = {}
    for k, v in rec.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"train/{k}"] = v
        elif isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, (int, float)):
                    out[f"{k}/{kk}"] = vv
    return out


class MetricsSink:
    """Plain JSONL (``<output_dir>/metrics.jsonl``), TensorBoard events (``<output_dir>/tensorboard``) and an
    experiment tracker (``tracker``: ``write(rec)``, ``close()``; ``megaslm.tracking.WandbSink``)."""

    def __init__(self, output_dir: str, jsonl: bool = True, tensorboard: bool = False,
                 resume_step: Optional[int] = None, tracker=None):
        self.tracker = tracker
        path = os.path.join(output_dir, "metrics.jsonl")
        if jsonl and resume_step is not None:
            truncate_metrics(path, resume_step)
        self.f = open(path, "a") if jsonl else None
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from megaslm.config import ConfigError

                raise ConfigError("logging.tensorboard: true needs the `tensorboard` package (pip install tensorboard)") from None
            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, rec: Dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        if self.tb is not None:
            step = rec["step"]
            for name, v in scalars(rec).items():
                self.tb.add_scalar(name, v, step)
            self.tb.flush()
        if self.tracker is not None:
            self.tracker.write(rec)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
