"""Block-size autotuning over a stated config space, with a cached choice.

``triton.autotune`` is not used for attention because a config's block sizes also shape the host-side
block table (built once per batch and shared by all layers) and the grid; tuning here times the whole
launcher for each candidate of :func:`kernels.dispatch.attention_space` and remembers the fastest.

The choice is cached in-process and in a JSON file (``$MEGASLM_KERNEL_TUNE_CACHE``, default
``~/.cache/megaslm/kernel-tune.json``; written to a temporary name, then renamed), keyed by device name,
Triton version, kernel, head dim, dtype, GQA class and sequence-length bucket.  ``MEGASLM_KERNEL_TUNE=0``
turns tuning off (the first, default config of each space is used); deterministic callers never tune,
so their block sizes -- and so their bits -- do not depend on timing noise.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

_MEM: Dict[str, dict] = {}
_FILE_LOADED: Optional[Dict[str, dict]] = None


def enabled() -> bool:
    return os.environ.get("MEGASLM_KERNEL_TUNE", "1") != "0"


def cache_path() -> Path:
    env = os.environ.get("MEGASLM_KERNEL_TUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "megaslm" / "kernel-tune.json"


def _load() -> Dict[str, dict]:
    global _FILE_LOADED
    if _FILE_LOADED is None:
        try:
            data = json.loads(cache_path().read_text())
            _FILE_LOADED = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _FILE_LOADED = {}
    return _FILE_LOADED


def _store(key: str, cfg: dict, timings: List[float]) -> None:
    data = dict(_load())
    data[key] = {"config": cfg, "ms": timings}
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:  # a read-only home must not stop training; the in-process cache still holds
        pass
    _FILE_LOADED.update({key: data[key]})


def choose(key: str, configs: List[dict], bench: Callable[[dict], float]) -> dict:
    """The cached or measured fastest of ``configs`` (``bench(cfg)`` returns milliseconds)."""
    if len(configs) == 1 or not enabled():
        return configs[0]
    if _MEM.get(key) in configs:
        return _MEM[key]
    hit = _load().get(key)
    if hit is not None and hit.get("config") in configs:
        _MEM[key] = hit["config"]
        return _MEM[key]
    timings = []
    for cfg in configs:
        try:
            timings.append(float(bench(cfg)))
        except Exception:  # noqa: BLE001 - e.g. OutOfResources (shared memory) on a smaller part
            timings.append(float("inf"))
    best = min(range(len(configs)), key=lambda i: timings[i])
    if timings[best] == float("inf"):
        raise RuntimeError(f"autotune {key}: no config of {configs} ran")
    _MEM[key] = configs[best]
    _store(key, configs[best], timings)
    return configs[best]


def do_bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))
