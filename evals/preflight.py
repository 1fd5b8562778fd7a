"""What an evaluation can check before any model is built, without torch: the eval config (the checkpoint's
recorded config with the overrides and the eval layout, every rule) and the benchmarks against the
vocabulary the checkpoint records. ``launchers/eval.py`` runs it before torch is imported, so a typo in an
override is refused in a fraction of a second.

Building the eval model (process groups, the model, the checkpoint's weights) takes seconds to minutes;
a benchmark that cannot be scored -- an empty file, a unit outside the vocabulary, a manifest made for
another vocabulary -- is found here first, in one line naming the file, from the config the checkpoint
records (``meta.json``'s ``config``, else the ``config.yaml`` saved with it), read with the standard
library and ``megaslm.config``, ``config_io``, ``ports`` and ``checkpoint.layout`` (all torch-free).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Set, Tuple

from megaslm.checkpoint.layout import META, list_checkpoints, read_meta, resolve_tag_dir
from megaslm.config import ConfigError, RunConfig, config_digest
from megaslm.config_io import config_from_dict, derive_config, load_config
from megaslm.ports import env_world

from evals.benchmarks import Benchmark, check_vocab, load_benchmark
from evals.errors import EvalError


def recorded_config(ckpt: str) -> Optional[RunConfig]:
    """The run config ``ckpt`` records, as ``megaslm.checkpoint.reader.Checkpoint`` finds it but without
    opening a torch file: ``meta.json``'s ``config``, else ``config.yaml`` in the checkpoint or (matching the
    digest ``meta.json`` records) in the run directory. None where only a torch file holds it."""
    tag_dir = resolve_tag_dir(ckpt)
    meta = read_meta(tag_dir) if os.path.exists(os.path.join(tag_dir, META)) else {}
    try:
        if isinstance(meta.get("config"), dict):
            return config_from_dict(meta["config"])
        own = os.path.join(tag_dir, "config.yaml")
        if os.path.exists(own):
            return load_config(own)
        run_yaml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(tag_dir))), "config.yaml")
        if os.path.exists(run_yaml):
            cfg = load_config(run_yaml)
            digest = meta.get("config_digest")
            if digest is None or config_digest(cfg) == digest:
                return cfg
    except ConfigError:
        pass      # the checkpoint reader reports a saved config it cannot read, naming it
    return None


def eval_config(saved: RunConfig, overrides: Sequence[str] = (), world_size: Optional[int] = None,
                cuda: Optional[bool] = None) -> RunConfig:
    """The saved run config with the eval layout: ``overrides`` (``parallel.tensor=2`` ...) applied;
    TP/PP default to the training layout when the world size allows it, else TP=1, PP=1; DP = the
    rest of the world. No optimizer (ZeRO-0), one sample per micro-batch, fp32 without CUDA,
    no virtual pipeline (weights are canonical, so any layout loads them), no recompute or sequence
    parallelism unless asked for. ``cuda``: None before torch is imported (the launcher's check) checks as
    without CUDA, the layout that refuses least; ``evals.engine.eval_config`` passes this machine's."""
    world = world_size if world_size is not None else env_world()["world_size"]
    try:
        cfg = derive_config(saved, overrides, edit=lambda tree, user: _eval_layout(tree, user, world, cuda))
        cfg.validate(world_size=world)
    except ConfigError as e:
        raise EvalError(f"eval config: {e}") from None
    return cfg


def _eval_layout(tree: Dict, user: Set[str], world: int, cuda: Optional[bool]) -> None:
    """``eval_config``'s settings, on the saved tree: only where ``user`` (the overridden keys) says nothing."""
    p = tree["parallel"]
    if world % (int(p["tensor"]) * int(p["pipeline"])) != 0 and not ({"parallel.tensor", "parallel.pipeline"} & user):
        p["tensor"], p["pipeline"] = 1, 1
    mp = int(p["tensor"]) * int(p["pipeline"])
    if world % mp != 0:
        raise EvalError(f"eval layout: world size {world} is not a multiple of tensor x pipeline = {mp}")
    if "parallel.data" not in user:
        p["data"] = world // mp
    p["virtual_pipeline"] = None
    p["zero_stage"] = 0
    # memory levers of training only: a forward without backward saves nothing to recompute, and sequence
    # parallelism would split the hidden states the alignment benchmark reads across the TP ranks
    if "parallel.sequence_parallel" not in user:
        p["sequence_parallel"] = False
    if not any(k.startswith("model.recompute") for k in user):
        tree["model"].update(recompute="none", recompute_num_layers=None)
    s = tree["schedule"]
    # the training schedule's stages, as step counts: a token budget is checked against one training step
    # (RunConfig.validate), which the eval batch below is not
    step = int(s["global_batch_size"]) * int(tree["model"]["seq_length"])
    for st in s["stages"]:
        if st.get("train_tokens") is not None:
            st["train_steps"], st["train_tokens"] = -(-int(st["train_tokens"]) // step), None
    s["micro_batch_size"] = 1
    s["global_batch_size"] = int(p["data"])
    if not cuda and tree.get("precision") in ("bf16", "fp16"):
        tree["precision"] = "fp32"


def preflight(path: str, bench_paths: Sequence[str], overrides: Sequence[str] = ()
              ) -> List[Tuple[str, Optional[Tuple[List[str], List[Benchmark]]]]]:
    """(checkpoint, ``prepare_benchmarks``'s answer) for every checkpoint of ``path`` (one checkpoint, a run
    directory or its checkpoints/ folder), in step order: all of them checked before the first model is built.
    Raises EvalError or ConfigError (a checkpoint not found) naming the file or field."""
    ckpts = list_checkpoints(path)
    cache: Dict = {}
    return [(c, prepare_benchmarks(c, bench_paths, overrides, cache)) for c in ckpts]


def prepare_benchmarks(ckpt: str, bench_paths: Sequence[str], overrides: Sequence[str] = (),
                       cache: Optional[Dict[Tuple[str, int], Benchmark]] = None
                       ) -> Optional[Tuple[List[str], List[Benchmark]]]:
    """(paths, loaded benchmarks) for ``ckpt``: ``bench_paths``, else the checkpoint's ``eval.benchmarks`` (with
    the overrides), each loaded (format, items, units) and checked against the checkpoint's recorded
    vocabulary. Every override and the eval layout are checked first (``eval_config``). Raises EvalError
    naming the file or field; None when the checkpoint records no config outside its torch files (the runner
    then checks after loading it, as before). ``cache``: benchmarks already loaded, by (path, max_items),
    shared across the checkpoints of a run."""
    saved = recorded_config(ckpt)
    if saved is None:
        return None
    cfg = eval_config(saved, overrides)
    paths = list(bench_paths) or list(cfg.eval.benchmarks)
    if not paths:
        raise EvalError("no benchmarks given (pass --benchmarks or set eval.benchmarks)")
    cache = {} if cache is None else cache
    benches = []
    for p in paths:
        key = (p, cfg.eval.max_items)
        if key not in cache:
            cache[key] = load_benchmark(p, cfg.eval.max_items)
        check_vocab(cache[key].vocab, cfg.vocab, p)
        benches.append(cache[key])
    return paths, benches
