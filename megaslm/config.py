"""One typed config tree for a run: its sections, their defaults and their validation rules.

Torch-free on purpose: a config can be loaded, validated and printed anywhere, before any process
group or tensor exists. Every error is a ``ConfigError`` whose message names the field (and the file)
and what was expected, so launchers can print one line and exit non-zero. Loading it from YAML,
overrides and plain trees: ``megaslm.config_io``.

    cfg = load_config("configs/tiny.yaml", ["parallel.tensor=2", "optimizer.lr=1e-3"])  # config_io
    cfg.validate(world_size=2)
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from megaslm.fsutil import atomic_write_text
from megaslm.vocab import UnitVocab


class ConfigError(ValueError):
    """A config value that is missing, unknown, of the wrong type or inconsistent with another."""


def _need(cond, fld: str, expected: str, got) -> None:
    """The one form of a validation error: ``<field>: expected <what>, got <value>``."""
    if not cond:
        raise ConfigError(f"{fld}: expected {expected}, got {got!r}")


# ------------------------------------------------------------------------------------------------
# The tree
# ------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int = 2          # grouped-query attention: KV heads
    kv_channels: Optional[int] = None  # head dim; default hidden_size / num_attention_heads
    seq_length: int = 128              # training context
    max_position_embeddings: Optional[int] = None  # default seq_length
    rotary_base: int = 10000
    rope_scaling: bool = False         # Llama-3.x long-context RoPE frequency scaling
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False         # Qwen2 shape: True
    tie_embeddings: bool = True
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128  # vocab padded to a multiple of this times TP
    # document-masked core attention: auto | flex | sdpa | triton | reference. auto: FlexAttention on a GPU
    # unless a stored GPU measurement shows our Triton kernel correct and faster there (kernels/choice.py);
    # SDPA with a boolean mask on CPU
    attention_backend: str = "auto"
    embedding_backend: str = "auto"    # auto | triton | reference | megatron
    document_mask: bool = True         # never attend across eod boundaries in packed sequences
    deterministic: bool = False        # bit-reproducible embedding backward (sorted, no atomics) on GPU
    init_from: Optional[str] = None    # Hugging Face Llama/Qwen2 directory to start from (TWIST; docs/interop.md)
    init_new_rows: str = "normal"      # unit-vocabulary rows on init_from: normal | mean | keep
    # per-token language embedding: a [1 + len(vocab.languages), hidden] table added to the unit
    # embedding, indexed by the datasets' language side channel (off by default, as in the paper)
    language_embedding: bool = False
    # activation recompute, megatron-core's: none | selective (recompute_modules inside each layer, default
    # the core attention) | full (whole layers: recompute_method uniform = checkpoint every
    # recompute_num_layers layers, block = recompute the first recompute_num_layers layers of each stage)
    recompute: str = "none"
    recompute_method: str = "uniform"
    recompute_num_layers: Optional[int] = None  # full: default 1 (uniform) / every layer of a chunk (block)
    # selective: core_attn and/or mlp (megatron-core 0.16's "layernorm" recompute needs TransformerEngine)
    recompute_modules: List[str] = field(default_factory=lambda: ["core_attn"])

    def validate(self) -> None:
        """The model's own rules (against the parallel layout: ``RunConfig.validate``)."""
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "seq_length"):
            _need(getattr(self, name) > 0, f"model.{name}", "a positive integer", getattr(self, name))
        if self.kv_channels is None:
            _need(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                  f"a multiple of model.num_attention_heads={self.num_attention_heads} (or set model.kv_channels)",
                  self.hidden_size)
        _need(self.num_attention_heads % self.num_query_groups == 0, "model.num_query_groups",
              f"a divisor of model.num_attention_heads={self.num_attention_heads}", self.num_query_groups)
        _need(self.attention_backend in ("auto", "flex", "sdpa", "triton", "reference"), "model.attention_backend",
              "one of auto, flex, sdpa, triton, reference", self.attention_backend)
        _need(self.recompute in ("none", "selective", "full"), "model.recompute", "none, selective or full",
              self.recompute)
        _need(self.recompute_method in ("uniform", "block"), "model.recompute_method", "uniform or block",
              self.recompute_method)
        if self.recompute_num_layers is not None:
            _need(self.recompute == "full", "model.recompute_num_layers", "null unless model.recompute=full",
                  self.recompute_num_layers)
        _need(isinstance(self.recompute_modules, list) and len(self.recompute_modules) >= 1
              and set(self.recompute_modules) <= {"core_attn", "mlp"}, "model.recompute_modules",
              "a non-empty list of core_attn, mlp (megatron-core's layernorm recompute needs TransformerEngine)",
              self.recompute_modules)
        _need(self.embedding_backend in ("auto", "triton", "reference", "megatron"), "model.embedding_backend",
              "one of auto, triton, reference, megatron", self.embedding_backend)
        if self.language_embedding:
            _need(self.embedding_backend != "megatron", "model.embedding_backend",
                  "auto, triton or reference with model.language_embedding=true (megatron's own embedding "
                  "has no language table)", self.embedding_backend)
        if self.max_position_embeddings is not None:
            _need(self.max_position_embeddings >= self.seq_length, "model.max_position_embeddings",
                  f">= model.seq_length={self.seq_length}", self.max_position_embeddings)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None  # interleaved 1F1B: model chunks per pipeline rank
    data: Optional[int] = None              # None: world_size / (tensor * pipeline)
    zero_stage: int = 1
    # megatron-core sequence parallelism (needs tensor > 1): norms, residuals and dropout-free activations
    # outside the TP regions are split along the sequence across the TP ranks (activation memory / TP)
    sequence_parallel: bool = False
    # intra-op threads per rank on CPU. 1 (default) is bit-reproducible: with 2+ threads some CPU kernels
    # split their sums differently from run to run under varying machine load (measured: two runs of
    # configs/tiny.yaml, one idle and one beside busy processes, differed from step 2 at 2 threads, even
    # with MKL single-threaded; identical at 1). 0: all cores / local ranks (faster, not reproducible).
    cpu_threads: int = 1

    def validate(self) -> None:
        """The layout's own rules (against the model and the world size: ``RunConfig.validate``)."""
        _need(self.tensor >= 1, "parallel.tensor", "an integer >= 1", self.tensor)
        _need(self.pipeline >= 1, "parallel.pipeline", "an integer >= 1", self.pipeline)
        if self.virtual_pipeline is not None:
            _need(self.pipeline > 1 and self.virtual_pipeline >= 1, "parallel.virtual_pipeline",
                  "null, or >= 1 with parallel.pipeline > 1", self.virtual_pipeline)
        _need(self.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", "0, 1, 2 or 3", self.zero_stage)
        if self.sequence_parallel:
            _need(self.tensor > 1, "parallel.sequence_parallel", "false with parallel.tensor=1 (it splits the "
                  "sequence across the tensor-parallel ranks)", self.sequence_parallel)
        _need(self.cpu_threads >= 0, "parallel.cpu_threads", "an integer >= 0 (0: all cores / local ranks)",
              self.cpu_threads)
        if self.pipeline > 1:
            _need(self.zero_stage in (0, 1), "parallel.zero_stage",
                  "0 or 1 with parallel.pipeline > 1 (megatron-core's pipeline schedules drive backward; "
                  "ZeRO-2/3 gradient and parameter partitioning do not compose with them, see README)",
                  self.zero_stage)
        if self.data is not None:
            _need(self.data >= 1, "parallel.data", "an integer >= 1", self.data)


@dataclass
class DataSource:
    path: str = ""           # indexed dataset prefix (<path>.bin/.idx, <path>.manifest.json)
    weight: float = 1.0


@dataclass
class StageConfig:
    name: str = "main"
    train_steps: Optional[int] = None   # exactly one of train_steps / train_tokens
    train_tokens: Optional[int] = None
    data: List[DataSource] = field(default_factory=list)

    def validate(self, where: str) -> None:
        """``where``: the stage's place in the config (``schedule.stages[i]``)."""
        _need((self.train_steps is None) != (self.train_tokens is None), where,
              "exactly one of train_steps / train_tokens",
              f"train_steps={self.train_steps}, train_tokens={self.train_tokens}")
        if self.train_steps is not None:
            _need(self.train_steps >= 1, f"{where}.train_steps", "an integer >= 1", self.train_steps)
        if self.train_tokens is not None:
            _need(self.train_tokens >= 1, f"{where}.train_tokens", "an integer >= 1", self.train_tokens)
        for j, src in enumerate(self.data):
            _need(bool(src.path), f"{where}.data[{j}].path", "a dataset prefix", src.path)
            _need(src.weight > 0, f"{where}.data[{j}].weight", "a positive number", src.weight)


@dataclass
class DataConfig:
    demo: bool = False            # build the synthetic demo corpus in the run directory and train on it
    demo_stories: int = 600
    mask_eod_loss: bool = True
    seed: int = 1234
    cache_dir: Optional[str] = None   # megatron's sample-index cache; default <output_dir>/cache/data_index
    # check each dataset's content hash (XXH3-128) against its manifest's before the model is built: on by
    # default, ~0.2-0.3 s per GB of .bin read from the page cache (2-core machine; cold data adds the disk
    # read); data.verify_hash=false skips it (sizes, headers and counts are still checked, and the loader
    # still refuses a token id outside the vocabulary)
    verify_hash: bool = True


@dataclass
class OptimizerConfig:
    lr: float = 5e-4
    min_lr: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0

    def validate(self) -> None:
        _need(self.lr > 0, "optimizer.lr", "a positive number", self.lr)
        _need(0 <= self.min_lr <= self.lr, "optimizer.min_lr", f"a number in [0, optimizer.lr={self.lr}]",
              self.min_lr)
        _need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optimizer.beta1/beta2", "numbers in [0, 1)",
              (self.beta1, self.beta2))
        _need(self.weight_decay >= 0, "optimizer.weight_decay", "a number >= 0", self.weight_decay)
        _need(self.clip_grad >= 0, "optimizer.clip_grad", "a number >= 0 (0 disables clipping)", self.clip_grad)


@dataclass
class ScheduleConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 8
    warmup_fraction: float = 0.05
    warmup_steps: Optional[int] = None   # overrides warmup_fraction
    decay: str = "linear"                # linear | cosine | constant
    stages: List[StageConfig] = field(default_factory=lambda: [StageConfig(train_steps=100)])

    def validate(self) -> None:
        """The schedule's own rules (the batch against the data-parallel size: ``RunConfig.validate``)."""
        _need(self.micro_batch_size >= 1, "schedule.micro_batch_size", "an integer >= 1", self.micro_batch_size)
        _need(self.decay in ("linear", "cosine", "constant"), "schedule.decay", "linear, cosine or constant",
              self.decay)
        _need(0.0 <= self.warmup_fraction < 1.0, "schedule.warmup_fraction", "a number in [0, 1)",
              self.warmup_fraction)
        _need(len(self.stages) >= 1, "schedule.stages", "at least one stage", self.stages)
        seen = set()
        for i, st in enumerate(self.stages):
            _need(st.name not in seen, f"schedule.stages[{i}].name", "a unique stage name", st.name)
            seen.add(st.name)
            st.validate(f"schedule.stages[{i}]")


@dataclass
class CheckpointConfig:
    interval: int = 0        # steps between saves; 0: only at the end
    keep_last: int = 3
    save: bool = True
    load: Optional[str] = None  # directory to resume from; default: the run's own checkpoints
    # check every byte of a checkpoint (CRC-32) before resuming from it, not only sizes and zip
    # directories (~0.6 s per GB per core, files in parallel); off only for a filesystem too slow to read
    verify_content: bool = True

    def validate(self) -> None:
        _need(self.keep_last >= 1, "checkpoint.keep_last", "an integer >= 1", self.keep_last)
        _need(self.interval >= 0, "checkpoint.interval", "an integer >= 0", self.interval)


@dataclass
class FaultsConfig:
    nan_policy: str = "stop"     # stop: raise, save nothing | skip: drop the step's update, carry on
    max_skipped_steps: int = 10  # with nan_policy=skip: stop after this many skipped steps in a run

    def validate(self) -> None:
        _need(self.nan_policy in ("stop", "skip"), "faults.nan_policy", "stop or skip", self.nan_policy)
        _need(self.max_skipped_steps >= 0, "faults.max_skipped_steps", "an integer >= 0", self.max_skipped_steps)


@dataclass
class LoggingConfig:
    interval: int = 1
    # on by default: ~1-2 ms per step record on a loaded 2-core CPU, within the noise of the tiny run's ~230 ms
    # step (README: Telemetry), once ~0.3 CPU-s for its import on the logging rank
    tensorboard: bool = True
    jsonl: bool = True
    # Weights & Biases (megaslm/tracking.py; the optional extra: pip install -e ".[wandb]"), rank 0 only
    wandb: bool = False
    wandb_project: str = "megaslm"
    wandb_entity: Optional[str] = None
    wandb_name: Optional[str] = None   # the run's display name; default: the config's name
    # online | offline (files only, `wandb sync` later) | disabled; default: $WANDB_MODE, else online
    wandb_mode: Optional[str] = None
    wandb_dir: Optional[str] = None    # wandb's own files; default: $WANDB_DIR, else output_dir
    wandb_tags: List[str] = field(default_factory=list)

    def validate(self) -> None:
        _need(self.interval >= 1, "logging.interval", "an integer >= 1", self.interval)
        _need(self.wandb_mode in (None, "online", "offline", "disabled"), "logging.wandb_mode",
              "online, offline or disabled (or unset: $WANDB_MODE, else online)", self.wandb_mode)
        if self.wandb and not _installed("wandb"):
            raise ConfigError('logging.wandb: true needs the wandb package, the optional extra: '
                              'pip install -e ".[wandb]"')


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing it (wandb takes seconds to import)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # a broken install, or sys.modules[module] set to None
        return False


@dataclass
class EvalConfig:
    """Benchmarks scored by evals/ (launchers/eval.py, and every ``interval`` steps during training)."""
    interval: int = 0                  # optimizer steps between evaluations during training; 0: off
    benchmarks: List[str] = field(default_factory=list)  # benchmark folders / .jsonl files (docs/evals.md)
    scoring: str = "mean"              # mean (whole utterance) | sum_continuation | mean_continuation (ending only)
    add_bos: bool = False              # prefix utterances with bos (only if the training data had it)
    batch_size: int = 16               # sequences per forward (length-bucketed)
    max_items: int = 0                 # per task; 0: all
    # held-out loss (computed by the trainer itself, no evaluator needed): the mean per-token loss over
    # the first ``valid_sequences`` sequences of ``valid`` (indexed-dataset prefixes, blended with equal
    # weights, a fixed sample) every ``valid_interval`` steps and at the last step; logged as valid_loss
    valid: List[str] = field(default_factory=list)
    valid_interval: int = 0
    valid_sequences: int = 64

    def __post_init__(self):
        if self.scoring not in ("mean", "sum_continuation", "mean_continuation"):
            raise ConfigError(f"eval.scoring: expected mean, sum_continuation or mean_continuation, got {self.scoring!r}")
        if self.interval < 0 or self.batch_size < 1 or self.max_items < 0:
            raise ConfigError("eval: expected interval >= 0, batch_size >= 1, max_items >= 0, got "
                              f"{self.interval}, {self.batch_size}, {self.max_items}")

    def validate(self) -> None:
        """The rules between this section's fields (``__post_init__`` checks the single values at load)."""
        if self.interval:
            _need(len(self.benchmarks) >= 1, "eval.benchmarks",
                  f"at least one benchmark folder or .jsonl file with eval.interval={self.interval}",
                  self.benchmarks)
        _need(self.valid_interval >= 0, "eval.valid_interval", "an integer >= 0", self.valid_interval)
        _need(bool(self.valid) == (self.valid_interval > 0),
              "eval.valid" if self.valid_interval else "eval.valid_interval",
              "eval.valid (held-out dataset prefixes) and eval.valid_interval >= 1 set together",
              self.valid if self.valid_interval else self.valid_interval)
        for j, path in enumerate(self.valid):
            _need(bool(path), f"eval.valid[{j}]", "a dataset prefix", path)


@dataclass
class RunConfig:
    name: str = "tiny"
    output_dir: str = "runs/tiny"
    seed: int = 1234
    precision: str = "auto"   # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    model: ModelConfig = field(default_factory=ModelConfig)
    vocab: UnitVocab = field(default_factory=UnitVocab)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ---- derived quantities ---------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        m = self.model
        return m.kv_channels or m.hidden_size // m.num_attention_heads

    def padded_vocab_size(self) -> int:
        mult = self.model.make_vocab_size_divisible_by * self.parallel.tensor
        return -(-self.vocab.size // mult) * mult

    def data_parallel_size(self, world_size: Optional[int] = None) -> int:
        if self.parallel.data is not None:
            return self.parallel.data
        mp = self.parallel.tensor * self.parallel.pipeline
        if world_size is None:
            return 1
        return world_size // mp

    def num_micro_batches(self, world_size: Optional[int] = None) -> int:
        s = self.schedule
        return s.global_batch_size // (s.micro_batch_size * self.data_parallel_size(world_size))

    @property
    def tokens_per_step(self) -> int:
        return self.schedule.global_batch_size * self.model.seq_length

    def stage_steps(self) -> List[int]:
        out = []
        for st in self.schedule.stages:
            out.append(st.train_steps if st.train_steps is not None else -(-st.train_tokens // self.tokens_per_step))
        return out

    def total_steps(self) -> int:
        return sum(self.stage_steps())

    def num_parameters(self) -> int:
        """Exact parameter count of the model this config builds (one copy, all shards)."""
        m = self.model
        h, f, L, v = m.hidden_size, m.ffn_hidden_size, m.num_layers, self.padded_vocab_size()
        kv = self.head_dim * m.num_query_groups
        q = self.head_dim * m.num_attention_heads
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if m.add_qkv_bias else 0)
        mlp = h * 2 * f + f * h                 # SwiGLU: gate+up fused, then down
        norms = 2 * h
        per_layer = attn + mlp + norms
        emb = v * h * (1 if m.tie_embeddings else 2)
        lang = self.vocab.num_lang_ids * h if m.language_embedding else 0
        return L * per_layer + h + emb + lang   # + final norm

    # ---- validation -----------------------------------------------------------------------
    def validate(self, world_size: Optional[int] = None, cuda: Optional[bool] = None) -> "RunConfig":
        """Each section's own rules (its ``validate``), then the rules that join sections. ``world_size``
        (when known) is checked against TP x PP x DP; ``cuda=False`` refuses what needs a GPU."""
        for section in (self.model, self.parallel, self.schedule, self.optimizer, self.checkpoint, self.logging,
                        self.eval, self.faults):
            section.validate()
        _need(self.precision in ("auto", "fp32", "bf16", "fp16"), "precision", "auto, fp32, bf16 or fp16",
              self.precision)
        self._validate_layout(world_size)
        m, p, s = self.model, self.parallel, self.schedule
        dp = self.data_parallel_size(world_size)
        _need(s.global_batch_size % (s.micro_batch_size * dp) == 0, "schedule.global_batch_size",
              f"a multiple of micro_batch_size x data-parallel size = {s.micro_batch_size} x {dp}",
              s.global_batch_size)
        # a token budget of less than one step would train one partial step (megaslm.data.stage_plans): refused,
        # by the rule the sweeps apply to the stages of a budget (megaslm/sweeps/expand.py: _stage_split)
        tps = self.tokens_per_step
        for i, st in enumerate(s.stages):
            if st.train_tokens is not None:
                _need(st.train_tokens >= tps, f"schedule.stages[{i}].train_tokens",
                      f"at least one step ({tps:,} tokens = schedule.global_batch_size x model.seq_length = "
                      f"{s.global_batch_size} x {m.seq_length})", st.train_tokens)
        if not self.data.demo:
            for i, st in enumerate(s.stages):
                _need(len(st.data) >= 1, f"schedule.stages[{i}].data", "at least one dataset (or data.demo=true)",
                      st.data)
        if cuda is False:
            _need(self.precision in ("auto", "fp32"), "precision", "auto or fp32 without a GPU", self.precision)
            _need(m.attention_backend != "flex", "model.attention_backend", "auto, sdpa, triton or reference "
                  "without a GPU (PyTorch's FlexAttention has no backward on CPU)", m.attention_backend)
        if p.pipeline > 1:
            # fp16 loss scaling lives in engine.backward, which megatron's pipeline schedules bypass
            _need(self.precision != "fp16", "precision", "auto, fp32 or bf16 with parallel.pipeline > 1",
                  self.precision)
        e = self.eval
        if e.valid:
            _need(e.valid_sequences >= 1 and e.valid_sequences % (s.micro_batch_size * dp) == 0,
                  "eval.valid_sequences",
                  f"a positive multiple of micro_batch_size x data-parallel size = {s.micro_batch_size} x {dp}",
                  e.valid_sequences)
        return self

    def _validate_layout(self, world_size: Optional[int]) -> None:
        """The model against the parallel layout, and the layout against the world size (when known)."""
        m, p = self.model, self.parallel
        _need(m.num_attention_heads % p.tensor == 0, "parallel.tensor",
              f"a divisor of model.num_attention_heads={m.num_attention_heads}", p.tensor)
        _need(m.num_query_groups % p.tensor == 0, "parallel.tensor",
              f"a divisor of model.num_query_groups={m.num_query_groups}", p.tensor)
        _need(m.ffn_hidden_size % p.tensor == 0, "parallel.tensor",
              f"a divisor of model.ffn_hidden_size={m.ffn_hidden_size}", p.tensor)
        layers_per_chunk = p.pipeline * (p.virtual_pipeline or 1)
        _need(m.num_layers % layers_per_chunk == 0, "model.num_layers",
              f"a multiple of parallel.pipeline x virtual_pipeline = {layers_per_chunk}", m.num_layers)
        if p.sequence_parallel:
            _need(m.seq_length % p.tensor == 0, "model.seq_length",
                  f"a multiple of parallel.tensor={p.tensor} with parallel.sequence_parallel=true", m.seq_length)
        if m.recompute == "full" and m.recompute_num_layers is not None:
            per_chunk = m.num_layers // layers_per_chunk
            _need(1 <= m.recompute_num_layers <= per_chunk, "model.recompute_num_layers",
                  f"an integer in [1, {per_chunk}] (layers per pipeline chunk)", m.recompute_num_layers)
        if world_size is not None:
            mp = p.tensor * p.pipeline
            dp = p.data if p.data is not None else world_size // mp
            _need(world_size == mp * dp and dp >= 1, "parallel",
                  f"world size {world_size} = tensor({p.tensor}) x pipeline({p.pipeline}) x data"
                  + (f"({p.data})" if p.data is not None else ""), world_size)

    def cpu_threads_per_rank(self, local_ranks: int) -> int:
        """Intra-op threads a CPU rank uses (``parallel.cpu_threads``; 0: the cores shared among local ranks)."""
        if self.parallel.cpu_threads:
            return self.parallel.cpu_threads
        return max(1, (os.cpu_count() or 1) // max(1, local_ranks))

    def resolved_precision(self, cuda: bool) -> str:
        if self.precision == "auto":
            return "bf16" if cuda else "fp32"
        return self.precision

    # ---- serialisation --------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str) -> None:
        """Write the resolved config whole (``megaslm.fsutil``: temporary name, fsync, rename)."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, self.to_yaml())


# ------------------------------------------------------------------------------------------------
# Plain form (loading it back: megaslm.config_io)
# ------------------------------------------------------------------------------------------------
def _to_plain(obj):
    if isinstance(obj, UnitVocab):
        d = dataclasses.asdict(obj)
        d["languages"] = list(obj.languages)
        return d
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(x) for x in obj]
    return obj


def config_digest(cfg: RunConfig) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
