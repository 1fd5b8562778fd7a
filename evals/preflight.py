"""What an evaluation can check before any model is built, without torch: the benchmarks against the
vocabulary the checkpoint records.

Building the eval model (process groups, the model, the checkpoint's weights) takes seconds to minutes;
a benchmark that cannot be scored -- an empty file, a unit outside the vocabulary, a manifest made for
another vocabulary -- is found here first, in one line naming the file, from the config the checkpoint
records (``meta.json``'s ``config``, else the ``config.yaml`` saved with it), read with the standard
library and ``megaslm.config``/``megaslm.checkpoint.layout`` (both torch-free).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from megaslm.checkpoint.layout import META, read_meta, resolve_tag_dir
from megaslm.config import ConfigError, RunConfig, config_digest
from megaslm.config_io import apply_override, config_from_dict, load_config

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


def prepare_benchmarks(ckpt: str, bench_paths: Sequence[str], overrides: Sequence[str] = (),
                       cache: Optional[Dict[Tuple[str, int], Benchmark]] = None
                       ) -> Optional[Tuple[List[str], List[Benchmark]]]:
    """(paths, loaded benchmarks) for ``ckpt``: ``bench_paths``, else the checkpoint's ``eval.benchmarks`` (with
    the ``eval.*`` overrides), each loaded (format, items, units) and checked against the checkpoint's recorded
    vocabulary. Raises EvalError naming the file; None when the checkpoint records no config outside its
    torch files (the runner then checks after loading it, as before). ``cache``: benchmarks already loaded,
    by (path, max_items), shared across the checkpoints of a run."""
    saved = recorded_config(ckpt)
    if saved is None:
        return None
    try:
        tree = saved.to_dict()
        for item in overrides:
            if item.partition("=")[0].strip().startswith("eval."):
                apply_override(tree, item)
        cfg = config_from_dict(tree)
    except ConfigError as e:
        raise EvalError(f"eval config: {e}") from None
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
