"""A per-rank GPU memory plan of a run, before anything is queued (``plan(cfg, world_size)``).

Torch-free on purpose, like ``megaslm.config``: ``launchers/pretrain.py --dry-run --gpu-memory GIB`` and
``launchers/sweep.py plan`` call it with nothing but a config. Every figure is bytes on one rank; the plan
gives each pipeline stage (stages differ: the first holds the embedding, the last the output layer and the
loss, and 1F1B keeps more micro-batches in flight on earlier stages) and names the worst rank.

The byte model (N = parameters on the rank: its TP shard of its pipeline stage, a tied output weight
counted again on the last stage when PP > 1 because that stage holds a copy; dp = data-parallel size;
b = 2 bytes for bf16/fp16 runs, 4 for fp32):

  parameters   b*N; divided by dp at ZeRO-3
  gradients    b*N (DeepSpeed accumulates in the parameters' dtype: no ``data_types.grad_accum_dtype`` is
               set in ``megaslm/ds_adapter.py``); divided by dp from ZeRO-2 on
  optimizer    bf16/fp16: fp32 master weights + Adam m + v = 12*N. fp32 runs: Adam m + v = 8*N at ZeRO-0
               (the torch optimizer steps the parameters themselves), 12*N from ZeRO-1 on (DeepSpeed's
               ZeRO-1/2 optimizer clones an fp32 master partition even when the model is fp32). Divided by
               dp from ZeRO-1 on
  buffers      ZeRO-1/2: DeepSpeed's contiguous gradient bucket, ``reduce_bucket_size`` (its default 5e8
               elements) x b, allocated at the first backward whatever the model size. ZeRO-3: the same
               bucket plus the gathered working set (the largest module's full parameters, i.e. one
               layer or the embedding, plus ``stage3_prefetch_bucket_size`` 5e7 elements) x b
  step         the optimizer step's fp32 copy of the gradient partition (4*N/dp from ZeRO-1 on; 4*N at
               ZeRO-0 in bf16/fp16): it exists while no activation does, so the peak is the larger of
               the activations and this
  overhead     a fixed 1.5 GiB: CUDA context, cuBLAS/NCCL workspaces and the caching allocator's slack
               (an assumption, not a measurement; none in a plan made for CPU, ``cuda=False``)

Activations are derived per op for megaslm's model (megatron-core's local layer spec as
``megaslm.model.layer_spec`` builds it) from what each op saves for backward, every storage counted once.
T = micro-batch x sequence tokens, t = TP, s = t with sequence parallelism else 1 (what lives outside
the TP regions is split along the sequence), q = heads x head dim, kv = KV groups x head dim, F = SwiGLU
width, V = padded vocabulary, H = heads:

  per layer     input and pre-MLP RMSNorm: their input T/s*h*b and the fp32 rstd T/s*4 (on CPU torch's
                rms_norm is composite and also keeps x*rstd, T/s*h*b); QKV and fc1 linears: their input
                (the norm output) T/s*h*b (megatron keeps the local shard under sequence parallelism and
                gathers again in backward); RoPE: cos and sin for q and for k, 4 x [S, d] in b; core
                attention, per backend (below); the output projection's input; SwiGLU: fc1's output
                T*2F/t*b, silu(gate) and the linear half (+0 offset, a new tensor) T*F/t*b each, fc2's
                input T*F/t*b; residual adds keep nothing
  core attention  flex / triton: q and k after RoPE (T*q/t*b, T*kv/t*b), v, a view that keeps the whole
                fused QKV output alive (T*(q+2kv)/t*b), the output T*q/t*b (the projection's input is a
                view of it: 0 more) and the fp32 logsumexp H/t*B*S*4. sdpa: the same plus the boolean
                [B,1,S,S] mask converted to an additive mask in b (per layer). reference: fp32 q and k, v
                repeated to H heads (3 x T*q/t*4), the boolean mask B*S*S and the fp32 probabilities
                B*H/t*S*S*4; the projection's input is a copy, T*q/t*b
  embedding     the ids (int64, 8 B per token; the CPU reference also an fp32 mask, 12 B per token)
  last stage    final norm as above, the output layer's input T/s*h*b, vocab-parallel cross-entropy's fp32
                softmax T*V/t*4 plus its target mask and masked targets (9 B per token), the trainer's fp32
                loss mask (4 B per token); in bf16 the logits' low-precision copy T*V/t*b lives while the
                fp32 one is made (a transient)
  pipeline      a non-last stage also keeps its output T/s*h*b per micro-batch in flight
                (``deallocate_pipeline_outputs`` is off)

Recompute (megatron-core's, ``megaslm.model.recompute_kwargs``): selective ``core_attn`` keeps the
checkpoint's inputs (q, k, the QKV output that v views, the segment ids, a 4-byte mask-type tensor) and
the projection's input, not the attention internals; ``mlp`` keeps only the MLP's input (fc1's input,
kept anyway). Full ``uniform`` N keeps the input of each N-layer group of a chunk (plus the segment ids
and the fp32 RoPE table [S, d], once per micro-batch); ``block`` N keeps only the inputs of the first N
layers of each chunk and everything of the others. While one group is recomputed in backward its
activations exist again: the largest such group (or, for selective, one layer's recomputed part) is
added as a transient, as is the loss's logits copy on the last stage (the larger of the two).

Micro-batches in flight: PP = 1: one (the trainer runs forward and backward per micro-batch). 1F1B:
stage i holds min(pp - i, M). Interleaved (``parallel.virtual_pipeline``): megatron-core's own order is
replayed (``megaslm.pp_schedule``: ``_schedule_table`` = its ``get_schedule_table``; warm-up
(pp - i - 1) * 2 + (vpp - 1) * pp model-chunk micro-batches, capped by M * vpp, then one forward and one
backward at a time), which gives the peak and which chunks (embedding, loss) are in flight at it.

Measured against the real model on CPU (tests/test_memory_plan.py: bytes saved for backward by one
micro-batch forward, every recompute mode, TP 1 and 2, sequence parallelism on and off, sdpa and
reference): the estimate matches the count to the byte in each case. GPU-only paths (fused rms_norm,
flex, bf16 casts) follow the same rules from the torch / megatron-core sources and are not measured here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from megaslm.config import ConfigError, RunConfig
from megaslm.config_io import apply_override, config_from_dict
from megaslm.pp_schedule import in_flight

GIB = 2 ** 30
OVERHEAD_BYTES = int(1.5 * GIB)          # CUDA context + workspaces + allocator slack (assumed)
REDUCE_BUCKET_ELEMENTS = 500_000_000      # DeepSpeed zero_optimization.reduce_bucket_size default
PREFETCH_BUCKET_ELEMENTS = 50_000_000     # DeepSpeed stage3_prefetch_bucket_size default

# GPU memory by device name (nominal, GiB); the first fragment found in the name wins
KNOWN_GPUS: Tuple[Tuple[str, float], ...] = (
    ("GH200", 96.0), ("H200", 141.0), ("H100", 80.0), ("H800", 80.0), ("A100", 80.0), ("A800", 80.0),
    ("L40", 48.0), ("A6000", 48.0), ("V100", 32.0),
)


def gpu_memory_gib(device: str) -> Optional[float]:
    """Nominal memory of a GPU named in ``device`` (e.g. "one H100 (assumed, bf16)" -> 80, "A100-SXM4-40GB"
    -> 40: a size written in the name wins), else None."""
    up = device.upper()
    for frag, gib in KNOWN_GPUS:
        if frag in up:
            size = re.search(r"(?<![0-9])(16|24|32|40|48|80|94|96|141)\s*GB?(?![A-Z])", up)
            return float(size.group(1)) if size else gib
    return None


# ------------------------------------------------------------------------------------------------
# What runs where
# ------------------------------------------------------------------------------------------------
def precision(cfg: RunConfig, cuda: bool) -> str:
    return cfg.resolved_precision(cuda)


def attention_backend(cfg: RunConfig, cuda: bool) -> str:
    """The backend ``model.attention_backend`` resolves to (kernels/choice.py's rule: auto is flex on a GPU,
    or triton where a stored measurement promotes it -- the same memory either way -- and sdpa on CPU)."""
    b = cfg.model.attention_backend
    if b == "auto":
        return "flex" if cuda else "sdpa"
    return b


def embedding_backend(cfg: RunConfig, cuda: bool) -> str:
    b = cfg.model.embedding_backend
    if b == "auto":
        return "triton" if cuda else "reference"
    return b


@dataclass(frozen=True)
class _Dims:
    B: int      # micro-batch
    S: int      # sequence
    T: int      # tokens per micro-batch
    h: int
    q: int      # query width per TP rank (heads / t x head dim)
    kv: int     # key/value width per TP rank
    F: int      # SwiGLU width per TP rank
    H: int      # query heads per TP rank
    d: int      # head dim
    V: int      # vocabulary rows per TP rank
    sp: int     # sequence split of what lives outside the TP regions
    b: int      # activation bytes
    cuda: bool


def _dims(cfg: RunConfig, cuda: bool) -> _Dims:
    m, p = cfg.model, cfg.parallel
    t = p.tensor
    B, S = cfg.schedule.micro_batch_size, m.seq_length
    d = cfg.head_dim
    return _Dims(B=B, S=S, T=B * S, h=m.hidden_size, q=m.num_attention_heads // t * d,
                 kv=m.num_query_groups // t * d, F=m.ffn_hidden_size // t, H=m.num_attention_heads // t, d=d,
                 V=cfg.padded_vocab_size() // t, sp=t if p.sequence_parallel else 1,
                 b=4 if precision(cfg, cuda) == "fp32" else 2, cuda=cuda)


# ------------------------------------------------------------------------------------------------
# Activations, per op
# ------------------------------------------------------------------------------------------------
def _norm(D: _Dims) -> int:
    """One RMSNorm: its input and the fp32 rstd; torch's CPU rms_norm (composite) also keeps x * rstd."""
    rows = D.T // D.sp
    return rows * D.h * D.b + rows * 4 + (0 if D.cuda else rows * D.h * D.b)


def _core_attention(D: _Dims, backend: str) -> Dict[str, int]:
    T, b = D.T, D.b
    if backend == "reference":
        return {"attention q, k, v (fp32, repeated)": 3 * T * D.q * 4,
                "attention mask (bool)": D.B * D.S * D.S,
                "attention probabilities (fp32)": D.B * D.H * D.S * D.S * 4,
                "projection input": T * D.q * b}
    out = {"attention q (after RoPE)": T * D.q * b, "attention k (after RoPE)": T * D.kv * b,
           "fused QKV output (v views it)": T * (D.q + 2 * D.kv) * b, "attention output": T * D.q * b,
           "attention logsumexp (fp32)": D.B * D.H * D.S * 4}
    if backend == "sdpa":
        out["attention mask (additive, per layer)"] = D.B * D.S * D.S * b
    return out


def layer_activations(cfg: RunConfig, cuda: bool = True) -> Dict[str, int]:
    """Bytes one transformer layer saves for backward for one micro-batch, per op, without recompute."""
    D = _dims(cfg, cuda)
    T, b = D.T, D.b
    out = {"input norm": _norm(D), "QKV input": T // D.sp * D.h * b, "RoPE cos/sin": 4 * D.S * D.d * b}
    out.update(_core_attention(D, attention_backend(cfg, cuda)))
    out.update({"pre-MLP norm": _norm(D), "fc1 input": T // D.sp * D.h * b, "fc1 output": T * 2 * D.F * b,
                "silu(gate)": T * D.F * b, "SwiGLU linear half": T * D.F * b, "fc2 input": T * D.F * b})
    return out


_MLP_INTERNALS = ("fc1 output", "silu(gate)", "SwiGLU linear half", "fc2 input")


def _selective_layer(cfg: RunConfig, D: _Dims, full: Dict[str, int]) -> Dict[str, int]:
    mods = set(cfg.model.recompute_modules)
    out = dict(full)
    if "core_attn" in mods:
        for k in _core_attention(D, attention_backend(cfg, D.cuda)):
            out.pop(k)
        out.pop("projection input", None)
        out.update({"core_attn checkpoint: q, k": D.T * (D.q + D.kv) * D.b,
                    "core_attn checkpoint: fused QKV output": D.T * (D.q + 2 * D.kv) * D.b,
                    "core_attn checkpoint: mask type": 4, "projection input": D.T * D.q * D.b})
    if "mlp" in mods:
        for k in _MLP_INTERNALS:
            out.pop(k)
    return out


def _per_layer_bytes(cfg: RunConfig, cuda: bool) -> Tuple[int, int]:
    """(bytes of a layer without recompute, bytes with the configured selective recompute)."""
    D = _dims(cfg, cuda)
    full = layer_activations(cfg, cuda)
    return sum(full.values()), sum(_selective_layer(cfg, D, full).values())


def chunk_activations(cfg: RunConfig, cuda: bool = True, first: bool = True, last: bool = True,
                      layers: Optional[int] = None) -> Dict[str, int]:
    """Bytes one model chunk saves for backward for ONE micro-batch, by part: ``layers`` transformer layers
    (default: a whole pipeline chunk), with the embedding when ``first``, the final norm, output layer and
    loss when ``last``, and the stage output a pipeline keeps when not ``last`` and PP > 1."""
    m, p = cfg.model, cfg.parallel
    D = _dims(cfg, cuda)
    T, b = D.T, D.b
    per_chunk = m.num_layers // (p.pipeline * (p.virtual_pipeline or 1))
    L = per_chunk if layers is None else layers
    out: Dict[str, int] = {}
    if first:
        emb = embedding_backend(cfg, cuda)
        out["embedding"] = T * (12 if emb == "reference" else 8) + (T * 8 if m.language_embedding else 0)
    full = layer_activations(cfg, cuda)
    layer_full = sum(full.values())
    if m.recompute == "none":
        out["layers"] = L * layer_full
    elif m.recompute == "selective":
        sel = _selective_layer(cfg, D, full)
        out["layers"] = L * sum(sel.values())
        if "core_attn" in m.recompute_modules:
            out["segment ids (checkpoint input)"] = D.B * D.S * 4
    else:
        n = _recompute_n(cfg)
        inputs = T // D.sp * D.h * b
        if m.recompute_method == "uniform":
            out["layers"] = math.ceil(L / n) * inputs
        else:
            k = min(n, L)
            out["layers"] = k * inputs + (L - k) * layer_full
        out["segment ids + RoPE table (checkpoint inputs)"] = D.B * D.S * 4 + D.S * D.d * 4
    if last:
        out["final norm"] = _norm(D)
        out["output layer input"] = T // D.sp * D.h * b
        out["cross-entropy (fp32 softmax, targets)"] = T * D.V * 4 + T * 9
        out["loss mask"] = T * 4
    elif p.pipeline > 1:
        out["stage output (kept by the schedule)"] = T // D.sp * D.h * b
    return out


def _recompute_n(cfg: RunConfig) -> int:
    m, p = cfg.model, cfg.parallel
    per_chunk = m.num_layers // (p.pipeline * (p.virtual_pipeline or 1))
    return m.recompute_num_layers or (1 if m.recompute_method == "uniform" else per_chunk)


def _recompute_transient(cfg: RunConfig, cuda: bool) -> int:
    """Activations that exist again while one recompute group (or a layer's recomputed part) runs backward."""
    m = cfg.model
    full, sel = _per_layer_bytes(cfg, cuda)
    if m.recompute == "selective":
        return full - sel
    if m.recompute == "full":
        per_chunk = m.num_layers // (cfg.parallel.pipeline * (cfg.parallel.virtual_pipeline or 1))
        return (min(_recompute_n(cfg), per_chunk) if m.recompute_method == "uniform" else 1) * full
    return 0


def _loss_transient(cfg: RunConfig, cuda: bool) -> int:
    D = _dims(cfg, cuda)
    return 0 if D.b == 4 else D.T * D.V * D.b


# ------------------------------------------------------------------------------------------------
# Parameters and optimizer
# ------------------------------------------------------------------------------------------------
def layer_parameters(cfg: RunConfig) -> int:
    """Parameters of one transformer layer on one TP rank (norm weights are replicated)."""
    m, t = cfg.model, cfg.parallel.tensor
    d = cfg.head_dim
    q, kv, h, F = m.num_attention_heads * d, m.num_query_groups * d, m.hidden_size, m.ffn_hidden_size
    attn = h * (q + 2 * kv) // t + q * h // t + ((q + 2 * kv) // t if m.add_qkv_bias else 0)
    return attn + 3 * h * F // t + 2 * h


def stage_parameters(cfg: RunConfig) -> List[int]:
    """Parameters one rank of each pipeline stage holds (its TP shard); a tied output weight is held again
    by the last stage when PP > 1 (megatron keeps a copy there and sums the two gradients)."""
    m, p = cfg.model, cfg.parallel
    h, t, pp = m.hidden_size, p.tensor, p.pipeline
    emb = cfg.padded_vocab_size() // t * h
    out = []
    for r in range(pp):
        n = m.num_layers // pp * layer_parameters(cfg)
        if r == 0:
            n += emb + (cfg.vocab.num_lang_ids * h if m.language_embedding else 0)
        if r == pp - 1:
            n += h + (emb if (not m.tie_embeddings or pp > 1) else 0)
        out.append(n)
    return out


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
@dataclass
class StageMemory:
    stage: int                 # pipeline stage
    rank: int                  # its first global rank (tp 0, dp 0: megatron orders TP, then DP, then PP)
    params: int                # parameter count on the rank
    parameters: int            # bytes
    gradients: int
    optimizer: int
    buffers: int               # ZeRO communication buckets / gathered parameters
    stored: int                # activations of the micro-batches in flight at the peak
    in_flight: int             # (model-chunk) micro-batches in flight at the peak
    transient: int             # recompute group / loss logits copy on top of that
    step: int                  # the optimizer step's fp32 gradient partition (no activations then)
    overhead: int = OVERHEAD_BYTES
    per_microbatch: Dict[str, int] = field(default_factory=dict)   # one micro-batch of the stage, by part

    @property
    def activations(self) -> int:
        return self.stored + self.transient

    @property
    def total(self) -> int:
        return (self.overhead + self.parameters + self.gradients + self.optimizer + self.buffers
                + max(self.activations, self.step))


@dataclass
class MemoryPlan:
    precision: str
    attention: str
    tensor: int
    pipeline: int
    virtual_pipeline: Optional[int]
    data: int
    zero_stage: int
    micro_batch: int
    micro_batches: int         # per optimizer step per DP rank
    recompute: str
    sequence_parallel: bool
    stages: List[StageMemory]
    gpu_bytes: Optional[int] = None
    levers: List[Tuple[str, str, Optional[int]]] = field(default_factory=list)  # (part, overrides, total)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: (s.total, -s.stage))

    @property
    def fits(self) -> Optional[bool]:
        return None if self.gpu_bytes is None else self.worst.total <= self.gpu_bytes

    def table(self) -> List[str]:
        """The per-rank table: one column per pipeline stage (one for every rank when PP = 1)."""
        cols = [f"pp stage {s.stage} (rank {s.rank})" for s in self.stages] if self.pipeline > 1 else ["every rank"]
        zero = f"ZeRO-{self.zero_stage}" + (f", / DP {self.data}" if self.zero_stage and self.data > 1 else "")
        master = "fp32 master + Adam m, v" if self.precision != "fp32" or self.zero_stage else "Adam m, v"
        rows = [
            (f"parameters ({self.precision})", [s.parameters for s in self.stages]),
            (f"gradients ({self.precision})", [s.gradients for s in self.stages]),
            (f"optimizer ({master}, {zero})", [s.optimizer for s in self.stages]),
            ("ZeRO buckets", [s.buffers for s in self.stages]),
            ("activations", [s.activations for s in self.stages]),
            ("overhead (CUDA context, allocator)", [s.overhead for s in self.stages]),
            ("total", [s.total for s in self.stages]),
        ]
        w0 = max(len(r[0]) for r in rows)
        wc = [max(len(c), 9) for c in cols]
        lines = ["memory per rank (GiB): " + ", ".join([
            f"{self.precision}", f"TP {self.tensor} x PP {self.pipeline}"
            + (f" (virtual {self.virtual_pipeline})" if self.virtual_pipeline else "") + f" x DP {self.data}",
            f"ZeRO-{self.zero_stage}", f"attention {self.attention}", f"recompute {self.recompute}",
            f"sequence parallel {'on' if self.sequence_parallel else 'off'}",
            f"micro-batch {self.micro_batch} x {self.micro_batches} per step"])]
        lines.append("  ".join([" " * w0] + [c.rjust(w) for c, w in zip(cols, wc)]))
        for name, vals in rows:
            lines.append("  ".join([name.ljust(w0)] + [f"{v / GIB:.2f}".rjust(w) for v, w in zip(vals, wc)]))
        for s in self.stages:
            where = f"pp stage {s.stage}: " if self.pipeline > 1 else ""
            unit = "model-chunk micro-batches" if self.virtual_pipeline else "micro-batches"
            if s.in_flight == 1:
                unit = unit[:-2] if unit.endswith("es") else unit
            lines.append(f"  activations {where}{s.in_flight} {unit} in flight = {s.stored / GIB:.2f} GiB"
                         f" (one micro-batch through the stage: {sum(s.per_microbatch.values()) / GIB:.2f} GiB)"
                         f" + {s.transient / GIB:.2f} GiB transient (a recompute group / the logits' copy);"
                         f" the optimizer step's fp32 gradient partition, {s.step / GIB:.2f} GiB, comes when"
                         " they are freed")
        if self.gpu_bytes is not None:
            w = self.worst
            verdict = "fits" if self.fits else f"does not fit (short {(w.total - self.gpu_bytes) / GIB:.1f} GiB)"
            lines.append(f"worst rank {w.rank} (pp stage {w.stage}): {w.total / GIB:.1f} GiB of "
                         f"{self.gpu_bytes / GIB:g} GiB: {verdict}")
        return lines

    def refusal(self) -> str:
        """One line: the shortfall of the worst rank and, per part, the levers that would shrink it."""
        w = self.worst
        gpu = self.gpu_bytes or 0
        parts = [("activations", w.activations), ("optimizer", w.optimizer), ("gradients", w.gradients),
                 ("parameters", w.parameters), ("ZeRO buckets", w.buffers)]
        bits = []
        for name, val in sorted(parts, key=lambda x: -x[1]):
            if val <= 0:
                continue
            levers = [f"{ov} -> {tot / GIB:.1f} GiB" + (" fits" if tot <= gpu else "")
                      if tot is not None else ov for part, ov, tot in self.levers if part == name]
            extra = ""
            if name == "activations":
                unit = "model-chunk micro-batch" if self.virtual_pipeline else "micro-batch"
                extra = f" for {w.in_flight} {unit}{'es' if w.in_flight != 1 else ''} in flight"
            bits.append(f"{name} {val / GIB:.1f} GiB{extra}" + (f" ({'; '.join(levers)})" if levers else ""))
        bits.append(f"overhead {w.overhead / GIB:.1f} GiB (fixed)")
        return (f"memory: rank {w.rank} (pp stage {w.stage}) needs {w.total / GIB:.1f} GiB of {gpu / GIB:g} GiB "
                f"(short {(w.total - gpu) / GIB:.1f} GiB): " + ", ".join(bits))


def _optimizer_bytes(prec: str, zero: int, n: int, dp: int) -> Tuple[int, int, int, int]:
    """(parameters, gradients, optimizer, optimizer-step transient) bytes for n parameters on a rank."""
    b = 4 if prec == "fp32" else 2
    part = math.ceil(n / dp) if zero >= 1 else n
    params = b * (math.ceil(n / dp) if zero == 3 else n)
    grads = b * (math.ceil(n / dp) if zero >= 2 else n)
    if prec == "fp32" and zero == 0:
        opt, step = 8 * n, 0
    else:
        opt, step = 12 * part, 4 * part
    return params, grads, opt, step


def plan(cfg: RunConfig, world_size: int, gpu_memory_gib: Optional[float] = None, cuda: bool = True,
         levers: bool = True) -> MemoryPlan:
    """The per-rank memory of ``cfg`` at ``world_size`` ranks, on a GPU by default (``cuda=False``: as the
    run would be on CPU: fp32, sdpa). ``levers``: when it does not fit ``gpu_memory_gib``, re-plan with
    each lever that applies and record the worst-rank total it would give."""
    cfg.validate(world_size=world_size)
    m, p = cfg.model, cfg.parallel
    dp = cfg.data_parallel_size(world_size)
    M = cfg.num_micro_batches(world_size)
    prec = precision(cfg, cuda)
    b = 4 if prec == "fp32" else 2
    pp, vpp = p.pipeline, p.virtual_pipeline
    v = vpp or 1
    recompute_t = _recompute_transient(cfg, cuda)
    loss_t = _loss_transient(cfg, cuda)
    stages = []
    for r, n in enumerate(stage_parameters(cfg)):
        chunks = []
        for c in range(v):
            vstage = c * pp + r
            chunks.append(chunk_activations(cfg, cuda, first=vstage == 0, last=vstage == pp * v - 1))
        sizes = [sum(ch.values()) for ch in chunks]
        stored, count = in_flight(pp, r, M, vpp, sizes)
        params, grads, opt, step = _optimizer_bytes(prec, p.zero_stage, n, dp)
        buffers = 0
        if p.zero_stage in (1, 2, 3):
            buffers = REDUCE_BUCKET_ELEMENTS * b
        if p.zero_stage == 3:
            largest = max(layer_parameters(cfg), cfg.padded_vocab_size() // p.tensor * m.hidden_size)
            buffers += (largest + PREFETCH_BUCKET_ELEMENTS) * b
        if p.zero_stage == 0 and dp > 1:
            step += min(n, REDUCE_BUCKET_ELEMENTS) * b   # the all-reduce's flattened bucket
        per_mb: Dict[str, int] = {}
        for ch in chunks:
            for k, val in ch.items():
                per_mb[k] = per_mb.get(k, 0) + val
        transient = max(recompute_t, loss_t if r == pp - 1 else 0)
        stages.append(StageMemory(stage=r, rank=r * p.tensor * dp, params=n, parameters=params, gradients=grads,
                                  optimizer=opt, buffers=buffers, stored=stored, in_flight=count,
                                  transient=transient, step=step, per_microbatch=per_mb,
                                  overhead=OVERHEAD_BYTES if cuda else 0))
    out = MemoryPlan(precision=prec, attention=attention_backend(cfg, cuda), tensor=p.tensor, pipeline=pp,
                     virtual_pipeline=vpp, data=dp, zero_stage=p.zero_stage, micro_batch=cfg.schedule.micro_batch_size,
                     micro_batches=M, recompute=_recompute_name(cfg), sequence_parallel=p.sequence_parallel,
                     stages=stages,
                     gpu_bytes=None if gpu_memory_gib is None else int(gpu_memory_gib * GIB))
    if levers and out.fits is False:
        out.levers = _levers(cfg, world_size, gpu_memory_gib, cuda)
    return out


def _recompute_name(cfg: RunConfig) -> str:
    m = cfg.model
    if m.recompute == "selective":
        return "selective (" + ", ".join(m.recompute_modules) + ")"
    if m.recompute == "full":
        return f"full ({m.recompute_method}, {_recompute_n(cfg)} layer{'s' if _recompute_n(cfg) > 1 else ''})"
    return "none"


def with_overrides(cfg: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """``cfg`` with ``a.b.c=value`` overrides applied (the same rule as ``load_config``)."""
    tree = cfg.to_dict()
    for o in overrides:
        apply_override(tree, o)
    return config_from_dict(tree)


def _levers(cfg: RunConfig, world: int, gpu_gib: Optional[float], cuda: bool) -> List[Tuple[str, str, Optional[int]]]:
    """(part, overrides, worst-rank total with them) for each lever that applies and gives a valid config."""
    m, p, s = cfg.model, cfg.parallel, cfg.schedule
    gpu = None if gpu_gib is None else int(gpu_gib * GIB)

    def total(ovs: Sequence[str], world_size: int = world) -> Optional[int]:
        try:
            return plan(with_overrides(cfg, ovs), world_size, gpu_gib, cuda, levers=False).worst.total
        except (ConfigError, ZeroDivisionError, ValueError):
            return None

    def first_fit(options: Sequence[Sequence[str]]) -> Optional[Tuple[str, int]]:
        """The first option that fits, else the smallest total among the valid ones."""
        best = None
        for ovs in options:
            t = total(ovs)
            if t is None:
                continue
            if gpu is not None and t <= gpu:
                return " ".join(ovs), t
            if best is None or t < best[1]:
                best = (" ".join(ovs), t)
        return best

    out: List[Tuple[str, str, Optional[int]]] = []

    def add(part: str, found):
        if found is not None:
            out.append((part, found[0], found[1]))

    # activations
    if m.recompute != "full":
        add("activations", first_fit([["model.recompute=full"]]))
    elif m.recompute_method == "block" or _recompute_n(cfg) > 1:
        add("activations", first_fit([["model.recompute_method=uniform", "model.recompute_num_layers=null"]]))
    if attention_backend(cfg, cuda) in ("reference", "sdpa") and cuda:
        add("activations", first_fit([["model.attention_backend=flex"]]))
    if p.tensor > 1 and not p.sequence_parallel:
        add("activations", first_fit([["parallel.sequence_parallel=true"]]))
    tp_options = [[f"parallel.tensor={p.tensor * k}", "parallel.sequence_parallel=true"] for k in (2, 4, 8)]
    add("activations", first_fit(tp_options))
    if s.micro_batch_size > 1:
        smaller = [k for k in range(s.micro_batch_size - 1, 0, -1) if s.micro_batch_size % k == 0]
        add("activations", first_fit([[f"schedule.micro_batch_size={k}"] for k in smaller]))
    # optimizer, gradients, parameters
    if p.zero_stage == 0:
        add("optimizer", first_fit([["parallel.zero_stage=1"]]))
    if p.pipeline == 1 and p.zero_stage < 2:
        add("gradients", first_fit([["parallel.zero_stage=2"]]))
    if p.pipeline == 1 and p.zero_stage < 3:
        add("parameters", first_fit([["parallel.zero_stage=3"]]))
    if p.zero_stage >= 1:
        dp = cfg.data_parallel_size(world)
        more = total([], world * 2) if p.data is None else None
        if more is not None:
            out.append(("optimizer", f"more data parallelism (world size {world * 2}, DP {dp * 2})", more))
    add("parameters", first_fit([[f"parallel.pipeline={p.pipeline * k}"] for k in (2, 4)]))
    return out
