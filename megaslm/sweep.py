"""Token-budget-matched sweeps: spec loading, expansion into run configs, matching, plan, state.

Torch-free on purpose (like ``megaslm.config``): a spec is loaded, validated, expanded and planned in
well under a second, before any data build or training starts. A sweep runs data builds, training and
evaluation as PROCESSES (``python -m data_tools``, ``launchers/pretrain.py``, ``launchers/eval.py``) and
reads their outputs (dataset manifests, checkpoint ``meta.json``, ``metrics.jsonl``, eval
``results.json``); this module imports none of ``data_tools``, ``evals`` or ``launchers``.

The spec format is documented in docs/sweeps.md; ``configs/sweeps/demo.yaml`` is the embedded default.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from megaslm.config import ConfigError, RunConfig, _build, _merge, _read_tree, apply_override, config_from_dict
from megaslm import memory  # torch-free: the per-rank memory plan the plan's fits column uses
from megaslm.telemetry import flops_per_token  # torch-free at import: the telemetry's own 6N + 12LHS formula

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"tiny": "configs/tiny.yaml", "qwen2-360m": "configs/qwen2-360m.yaml",
           "llama3.2-1b": "configs/llama3.2-1b.yaml"}
MATCHING = ("tokens", "flops")


class SweepError(ConfigError):
    """A sweep spec or sweep state problem; the message names the field (one line)."""


# ------------------------------------------------------------------------------------------------
# The spec tree (strict: unknown keys are errors, as in run configs)
# ------------------------------------------------------------------------------------------------
@dataclass
class DatasetSpec:
    """A dataset the runs may need: ``prefix`` (an indexed dataset prefix, or a folder/file for
    ``kind: files``) and, when it may be missing, the ``python -m data_tools`` arguments that make it.
    ``{data}`` is the sweep's data folder, ``{p}`` the interleave probability axis, ``{root}`` the repo."""
    prefix: str = ""
    build: Optional[List[str]] = None
    needs: List[str] = field(default_factory=list)   # datasets to build first
    kind: str = "indexed"                             # indexed (.bin/.idx + manifest) | files


@dataclass
class DataRef:
    dataset: str = ""
    weight: Any = 1.0      # a positive number, or "tokens": the dataset manifest's token total


@dataclass
class RecipeStage:
    name: str = ""
    fraction: float = 1.0  # share of the run's token budget (normalised over the stages)
    data: List[DataRef] = field(default_factory=list)


@dataclass
class RecipeSpec:
    stages: List[RecipeStage] = field(default_factory=list)


@dataclass
class ExecutorSpec:
    kind: str = "local"            # local | slurm | submitit-local
    parallel: int = 1              # local: runs at once
    gpus_per_run: int = 0          # local: CUDA devices per run (0: CPU, one process)
    nodes: int = 1                 # slurm: nodes per run (> 1: deepspeed over a hostfile)
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    partition: Optional[str] = None
    time_min: int = 60
    mem_gb: Optional[int] = None
    array: bool = False            # slurm: one job array instead of one job per run
    array_parallelism: int = 16
    python: Optional[str] = None   # interpreter for the jobs (default: this one)
    env: List[str] = field(default_factory=list)   # KEY=VALUE for the trainer/evaluator, e.g. OMP_NUM_THREADS=1


@dataclass
class ThroughputSpec:
    tokens_per_s: float = 20000.0  # per device, at the reference size; scaled by FLOPs/token for others
    reference: str = "tiny"        # the size the figure was measured at
    device: str = "2 CPU cores"
    # GiB per GPU for the plan's fits column; default: the nominal memory of a GPU named in ``device``
    # (megaslm.memory.KNOWN_GPUS: H100 80, A100 80 or 40, H200 141, ...); none for a CPU device
    gpu_memory_gib: Optional[float] = None


@dataclass
class SweepSpec:
    name: str = "sweep"
    output_dir: str = "runs/sweeps/sweep"
    base: str = "../tiny.yaml"                 # run config every run starts from (relative to the spec)
    sizes: List[Any] = field(default_factory=lambda: ["tiny"])
    recipes: List[str] = field(default_factory=list)
    budgets: List[float] = field(default_factory=list)
    matching: str = "tokens"                   # tokens | flops
    p: List[float] = field(default_factory=lambda: [0.5])
    seeds: List[int] = field(default_factory=lambda: [1234])
    overrides: List[str] = field(default_factory=list)
    grid: Dict[str, List[Any]] = field(default_factory=dict)   # a.b.c -> values: extra axes
    datasets: Dict[str, DatasetSpec] = field(default_factory=dict)
    custom_recipes: Dict[str, RecipeSpec] = field(default_factory=dict)
    benchmarks: List[str] = field(default_factory=list)        # dataset names (kind files) or paths
    # held-out loss for every run (eval.valid): dataset names or built prefixes, the same for every arm
    valid: List[str] = field(default_factory=list)
    valid_interval: int = 0                   # steps between held-out losses (and at the last step); 0: off
    valid_sequences: int = 64
    eval_overrides: List[str] = field(default_factory=lambda: ["eval.scoring=mean_continuation"])
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    throughput: ThroughputSpec = field(default_factory=ThroughputSpec)
    world_size: int = 1                       # processes per run (validated against the layout)


# The paper's recipes as stage fractions of one budget (configs/recipes/*: 75k / 10k / 15k steps).
BUILTIN_RECIPES: Dict[str, List[Tuple[str, float, List[Tuple[str, Any]]]]] = {
    "en_only": [("en_only", 1.0, [("en", 1.0)])],
    "fr_only": [("fr_only", 1.0, [("fr", 1.0)])],
    "en_fr": [("en_fr", 1.0, [("en", 0.75), ("fr", 0.25)])],
    "interleaving": [("en_only", 75 / 85, [("en", 1.0)]), ("interleaving", 10 / 85, [("interleaved", 1.0)])],
    "interleaving_ft": [("en_only", 0.75, [("en", 1.0)]), ("interleaving", 0.10, [("interleaved", 1.0)]),
                        ("ft_en_1", 0.0375, [("en", 1.0)]), ("ft_fr_1", 0.0375, [("fr", 1.0)]),
                        ("ft_en_2", 0.0375, [("en", 1.0)]), ("ft_fr_2", 0.0375, [("fr", 1.0)])],
}


# ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    size: str
    recipe: str
    budget: float
    p: Optional[float]
    seed: int
    grid: Dict[str, Any]
    config: RunConfig
    stage_tokens: List[int]
    datasets: List[str]            # dataset names this run needs

    @property
    def tokens(self) -> int:
        return sum(self.stage_tokens)

    @property
    def dir(self) -> str:
        return self.config.output_dir

    @property
    def arm(self) -> str:
        """Everything but the seed: runs of one arm are averaged."""
        return re.sub(r"\.s\d+$", "", self.name)

    def flops(self) -> float:
        return flops_per_token(self.config) * self.tokens


@dataclass
class Sweep:
    spec: SweepSpec
    path: str
    dir: str
    data_dir: str
    runs: List[Run]
    datasets: Dict[str, DatasetSpec]      # instantiated ({p} resolved) name -> spec
    benchmarks: List[str]                 # resolved paths
    bench_datasets: List[str]
    overrides: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Loading and validation
# ------------------------------------------------------------------------------------------------
def _fmt_num(x: float) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e18:
        return str(int(x))
    return f"{x:g}"


def _subst(text: str, where: str, **kw) -> str:
    try:
        return text.format(**kw)
    except (KeyError, IndexError, ValueError) as e:
        raise SweepError(f"{where}: {text!r}: unknown placeholder {e} (expected {{data}}, {{p}}, {{root}})") from None


def _size_model(entry: Any, where: str, base_tree: Dict) -> List[Tuple[str, Dict[str, Any]]]:
    """A size entry -> [(name, model section overrides)]."""
    if isinstance(entry, str):
        if entry not in PRESETS:
            raise SweepError(f"{where}: unknown size {entry!r}; expected a preset ({', '.join(PRESETS)}), a mapping "
                             "{name, num_layers, hidden_size, ...} or {ladder: ...}")
        tree = _read_tree(os.path.join(ROOT, PRESETS[entry]), ())
        return [(entry, dict(tree.get("model", {})))]
    if not isinstance(entry, dict):
        raise SweepError(f"{where}: expected a preset name or a mapping, got {entry!r}")
    if "ladder" in entry:
        extra = set(entry) - {"ladder"}
        if extra:
            raise SweepError(f"{where}.{sorted(extra)[0]}: unknown key beside ladder")
        return _ladder(entry["ladder"], f"{where}.ladder", base_tree)
    e = dict(entry)
    name = e.pop("name", None)
    if not isinstance(name, str) or not name:
        raise SweepError(f"{where}.name: expected a size name")
    return [(name, _shape(e, f"{where}"))]


def _shape(e: Dict[str, Any], where: str) -> Dict[str, Any]:
    """num_layers + hidden_size (+ optional head_dim / any model.* key) -> a model section."""
    from megaslm.config import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)} | {"head_dim"}
    for k in e:
        if k not in known:
            raise SweepError(f"{where}.{k}: unknown key; expected model fields ({', '.join(sorted(known))})")
    out = dict(e)
    h = out.get("hidden_size")
    if h is not None:
        hd = out.pop("head_dim", 16)
        if not isinstance(h, int) or h % hd:
            raise SweepError(f"{where}.hidden_size: expected a multiple of head_dim={hd}, got {h!r}")
        out.setdefault("num_attention_heads", h // hd)
        heads = out["num_attention_heads"]
        out.setdefault("num_query_groups", max(g for g in (1, 2, 4, 8) if heads % g == 0 and g <= heads))
        out.setdefault("ffn_hidden_size", int(math.ceil(h * 8 / 3 / 16) * 16))
    return out


def _ladder(spec: Any, where: str, base_tree: Dict) -> List[Tuple[str, Dict[str, Any]]]:
    """``{params: [N...], aspect: H/L, head_dim}`` or ``{layers: [...], hidden: [...]}`` -> sizes."""
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: expected a mapping {{params: [...]}} or {{layers: [...], hidden: [...]}}")
    allowed = {"params", "aspect", "head_dim", "layers", "hidden"}
    for k in spec:
        if k not in allowed:
            raise SweepError(f"{where}.{k}: unknown key; expected one of {', '.join(sorted(allowed))}")
    hd = spec.get("head_dim", 16)
    out = []
    if "params" in spec:
        aspect = spec.get("aspect", 32)
        for i, n in enumerate(spec["params"]):
            try:
                n = float(n)
            except (TypeError, ValueError):
                raise SweepError(f"{where}.params[{i}]: expected a parameter count, got {n!r}") from None
            best = None
            for L in range(1, 65):
                h = max(hd, int(round(aspect * L / hd)) * hd)
                model = _shape({"num_layers": L, "hidden_size": h, "head_dim": hd}, where)
                cfg = _model_cfg(base_tree, model, where)
                err = abs(math.log(cfg.num_parameters() / n))
                if best is None or err < best[0]:
                    best = (err, model, cfg.num_parameters())
            if best[0] > math.log(2):
                raise SweepError(f"{where}.params[{i}]: no depth/width at aspect {aspect} comes within 2x of {n:g} "
                                 f"parameters (nearest {best[2]:,})")
            out.append((f"L{best[1]['num_layers']}H{best[1]['hidden_size']}", best[1]))
    elif "layers" in spec and "hidden" in spec:
        Ls, Hs = spec["layers"], spec["hidden"]
        if not isinstance(Ls, list) or not isinstance(Hs, list) or len(Ls) != len(Hs):
            raise SweepError(f"{where}: layers and hidden: expected two lists of the same length")
        for L, h in zip(Ls, Hs):
            out.append((f"L{L}H{h}", _shape({"num_layers": L, "hidden_size": h, "head_dim": hd}, where)))
    else:
        raise SweepError(f"{where}: expected params: [...] or layers: [...] with hidden: [...]")
    return out


def _model_cfg(base_tree: Dict, model: Dict[str, Any], where: str) -> RunConfig:
    tree = _merge(base_tree, {"model": model})
    try:
        return config_from_dict(tree)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None


def _recipe_stages(spec: SweepSpec, name: str, where: str, spec_dir: str):
    """-> [(stage name, fraction, [(dataset or path, weight)])], and whether it came from a run config."""
    if name in spec.custom_recipes:
        r = spec.custom_recipes[name]
        if not r.stages:
            raise SweepError(f"custom_recipes.{name}.stages: expected at least one stage")
        return [(st.name or f"stage{i}", st.fraction, [(d.dataset, d.weight) for d in st.data])
                for i, st in enumerate(r.stages)]
    if name in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[name]
    path = name if os.path.isabs(name) else os.path.join(spec_dir, name)
    if name.endswith((".yaml", ".yml")):
        if not os.path.isfile(path):
            raise SweepError(f"{where}: recipe run config {name!r} not found (looked at {path})")
        tree = _read_tree(path, ())
        stages = (tree.get("schedule") or {}).get("stages") or []
        out = []
        for i, st in enumerate(stages):
            t = st.get("train_tokens")
            if not t:
                raise SweepError(f"{where}: {path}: schedule.stages[{i}]: a recipe run config needs train_tokens "
                                 "per stage (their ratios split the budget)")
            out.append((st.get("name", f"stage{i}"), float(t),
                        [(_dataset_for_path(spec, d["path"]), d.get("weight", 1.0)) for d in st.get("data", [])]))
        if not out:
            raise SweepError(f"{where}: {path}: no schedule.stages")
        return out
    raise SweepError(f"{where}: unknown recipe {name!r}; expected one of {', '.join(BUILTIN_RECIPES)}, a name under "
                     "custom_recipes, or a run config path (.yaml)")


def _dataset_for_path(spec: SweepSpec, path: str) -> str:
    """A run config's data path -> the spec's dataset of that name (``data/en`` -> ``en``; the paper
    recipes' ``data/enfr_interleaved`` -> ``interleaved``), else the path itself."""
    base = os.path.basename(os.path.normpath(path))
    for cand in (path, base, {"enfr_interleaved": "interleaved"}.get(base, "")):
        if cand in spec.datasets:
            return cand
    return path


def split_budget(tokens: int, fractions: Sequence[float]) -> List[int]:
    """Exact integer split of ``tokens`` by ``fractions`` (largest remainder): sums to ``tokens``."""
    tot = float(sum(fractions))
    raw = [tokens * f / tot for f in fractions]
    out = [int(math.floor(r)) for r in raw]
    rest = tokens - sum(out)
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[:rest]:
        out[i] += 1
    return out


def _read_yaml(path: str) -> Dict:
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except FileNotFoundError:
        raise SweepError(f"{path}: sweep spec not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SweepError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise SweepError(f"{path}: expected a mapping at the top level")
    return tree


def _line_of(path: str, key: str) -> str:
    """``path:LINE`` of the first line that starts the top-level (or nested) key, for error messages."""
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if re.match(rf"^\s*-?\s*{re.escape(key)}\s*:", line):
                    return f"{path}:{n}"
    except OSError:
        pass
    return path


def load_spec(path: str, overrides: Sequence[str] = ()) -> SweepSpec:
    tree = _read_yaml(path)
    for item in overrides:
        apply_override(tree, item)
    # mappings of named entries (megaslm.config's loader types lists and dataclasses, not dicts)
    maps = {"datasets": DatasetSpec, "custom_recipes": RecipeSpec, "grid": None}
    named: Dict[str, Dict] = {}
    try:
        for key, cls in maps.items():
            val = tree.pop(key, None) or {}
            if not isinstance(val, dict):
                raise ConfigError(f"{key}: expected a mapping of names to entries, got {val!r}")
            named[key] = {str(k): (_build(cls, v, f"{key}.{k}") if cls else v) for k, v in val.items()}
        spec = _build(SweepSpec, tree, "")
    except ConfigError as e:
        msg = str(e)
        first = msg.split(":", 1)[0]
        parts = re.split(r"[.\[]", first)
        key = parts[1] if parts[0] in maps and len(parts) > 1 else parts[0]
        raise SweepError(f"{_line_of(path, key)}: {msg}") from None
    for key, val in named.items():
        setattr(spec, key, val)
    return spec


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise SweepError(msg)


def expand(path: str, overrides: Sequence[str] = (), output_dir: Optional[str] = None,
           manifest_tokens=None) -> Sweep:
    """Load, validate and expand a spec into runs (no file written; see ``write_configs``).

    ``manifest_tokens(prefix) -> int | None`` reads a built dataset's token total (for ``weight:
    tokens``); the default reads ``<prefix>.manifest.json``."""
    spec = load_spec(path, overrides)
    spec_dir = os.path.dirname(os.path.abspath(path))
    src = path
    _need(spec.matching in MATCHING, f"{_line_of(src, 'matching')}: matching: expected tokens or flops, got {spec.matching!r}")
    _need(bool(spec.recipes), f"{src}: recipes: expected at least one recipe")
    _need(bool(spec.budgets), f"{src}: budgets: expected at least one token (or FLOPs) budget")
    _need(bool(spec.sizes), f"{src}: sizes: expected at least one size")
    _need(bool(spec.seeds), f"{src}: seeds: expected at least one seed")
    _need(bool(spec.p) and all(0.0 <= x <= 1.0 for x in spec.p), f"{_line_of(src, 'p')}: p: expected probabilities in [0, 1]")
    _need(spec.world_size >= 1, f"{src}: world_size: expected an integer >= 1")
    ex = spec.executor
    _need(ex.kind in ("local", "slurm", "submitit-local"),
          f"{_line_of(src, 'kind')}: executor.kind: expected local, slurm or submitit-local, got {ex.kind!r}")
    _need(ex.parallel >= 1 and ex.gpus_per_run >= 0 and ex.nodes >= 1,
          f"{_line_of(src, 'executor')}: executor: expected parallel >= 1, gpus_per_run >= 0, nodes >= 1")
    for kv in ex.env:
        _need("=" in kv and kv.partition("=")[0].isidentifier(),
              f"{_line_of(src, 'env')}: executor.env: expected KEY=VALUE, got {kv!r}")
    for i, b in enumerate(spec.budgets):
        _need(b > 0 and (spec.matching == "flops" or float(b).is_integer()),
              f"{_line_of(src, 'budgets')}: budgets[{i}]: expected a positive integer token count"
              f"{' (or FLOPs with matching: flops)' if spec.matching == 'tokens' else ''}, got {b!r}")

    out_dir = output_dir or spec.output_dir
    if not os.path.isabs(out_dir):
        out_dir = os.path.join(os.getcwd(), out_dir)
    data_dir = os.path.join(out_dir, "data")
    base_path = spec.base if os.path.isabs(spec.base) else os.path.join(spec_dir, spec.base)
    if not os.path.isfile(base_path):
        raise SweepError(f"{_line_of(src, 'base')}: base: run config {spec.base!r} not found (looked at {base_path})")
    try:
        base_tree = _merge(RunConfig().to_dict(), _read_tree(base_path, ()))
        for o in spec.overrides:
            apply_override(base_tree, o)
    except ConfigError as e:
        raise SweepError(f"{_line_of(src, 'overrides')}: overrides: {e}") from None

    # sizes
    sizes: List[Tuple[str, Dict]] = []
    for i, entry in enumerate(spec.sizes):
        sizes += _size_model(entry, f"{_line_of(src, 'sizes')}: sizes[{i}]", base_tree)
    names = [s[0] for s in sizes]
    dup = {n for n in names if names.count(n) > 1}
    _need(not dup, f"{_line_of(src, 'sizes')}: sizes: duplicate size name(s) {sorted(dup)}")
    _need(spec.throughput.reference in names or spec.throughput.reference in PRESETS,
          f"{_line_of(src, 'throughput')}: throughput.reference: {spec.throughput.reference!r} is neither a size of "
          f"this sweep ({', '.join(names)}) nor a preset ({', '.join(PRESETS)})")
    _need(spec.throughput.tokens_per_s > 0, f"{_line_of(src, 'throughput')}: throughput.tokens_per_s: expected > 0")

    # datasets: which use {p}
    def ds_uses_p(name: str, seen=()) -> bool:
        d = spec.datasets[name]
        txt = " ".join([d.prefix] + list(d.build or []))
        return "{p}" in txt or any(ds_uses_p(n, seen + (name,)) for n in d.needs if n not in seen and n in spec.datasets)

    for name, d in spec.datasets.items():
        where = f"{_line_of(src, name)}: datasets.{name}"
        _need(bool(d.prefix), f"{where}.prefix: expected the dataset's prefix (or path)")
        _need(d.kind in ("indexed", "files"), f"{where}.kind: expected indexed or files, got {d.kind!r}")
        for n in d.needs:
            _need(n in spec.datasets, f"{where}.needs: {n!r} is not a dataset of this spec")
    used_p = any(ds_uses_p(n) for n in spec.datasets)
    _need(len(spec.p) == 1 or used_p, f"{_line_of(src, 'p')}: p: several values but no dataset uses {{p}}")

    instances: Dict[str, DatasetSpec] = {}

    def inst(name: str, p: Optional[float], where: str) -> str:
        """Instantiate dataset ``name`` at ``p`` (and its needs); returns the instance key."""
        if name not in spec.datasets:
            raise SweepError(f"{where}: dataset {name!r} is not defined under datasets "
                             f"(defined: {', '.join(spec.datasets) or 'none'})")
        d = spec.datasets[name]
        up = ds_uses_p(name)
        key = f"{name}@p{_fmt_num(p)}" if up else name
        if key in instances:
            return key
        kw = dict(data=data_dir, p=_fmt_num(p) if p is not None else "", root=ROOT)
        needs = [inst(n, p, f"datasets.{name}.needs") for n in d.needs]
        prefix = _subst(d.prefix, f"datasets.{name}.prefix", **kw)
        if not os.path.isabs(prefix):
            prefix = os.path.join(spec_dir, prefix)
        build = [_subst(a, f"datasets.{name}.build", **kw) for a in d.build] if d.build else None
        instances[key] = DatasetSpec(prefix=prefix, build=build, needs=needs, kind=d.kind)
        return key

    def resolve_ref(ref: str, p: float, where: str) -> Tuple[Optional[str], str]:
        """A recipe's data reference: a dataset name -> (key, prefix); else an existing path."""
        if ref in spec.datasets:
            k = inst(ref, p, where)
            return k, instances[k].prefix
        path_ = ref if os.path.isabs(ref) else os.path.join(spec_dir, ref)
        if os.path.exists(path_ + ".bin") or os.path.exists(path_ + ".manifest.json"):
            return None, path_
        raise SweepError(f"{where}: data {ref!r} is neither a dataset of this spec (datasets: "
                         f"{', '.join(spec.datasets) or 'none'}) nor a built dataset at {path_} — no way to build it")

    bench_keys, bench_paths = [], []
    for i, b in enumerate(spec.benchmarks):
        if b in spec.datasets:
            k = inst(b, spec.p[0], f"benchmarks[{i}]")
            bench_keys.append(k)
            bench_paths.append(instances[k].prefix)
        else:
            pth = b if os.path.isabs(b) else os.path.join(spec_dir, b)
            _need(os.path.exists(pth), f"{_line_of(src, 'benchmarks')}: benchmarks[{i}]: {b!r} is neither a dataset "
                                       f"of this spec nor an existing path")
            bench_paths.append(pth)
    _need(bool(spec.valid) == (spec.valid_interval > 0),
          f"{_line_of(src, 'valid' if spec.valid else 'valid_interval')}: "
          f"{'valid_interval: expected an integer >= 1 with valid' if spec.valid else 'valid: expected held-out datasets with valid_interval'}")
    valid_keys, valid_paths = [], []
    for i, v in enumerate(spec.valid):
        k, pth = resolve_ref(v, spec.p[0], f"{_line_of(src, 'valid')}: valid[{i}]")
        if k:
            valid_keys.append(k)
        valid_paths.append(pth)
    if spec.valid:
        base_tree.setdefault("eval", {}).update(valid=valid_paths, valid_interval=spec.valid_interval,
                                                valid_sequences=spec.valid_sequences)
    for o in spec.eval_overrides:
        _need(o.split("=", 1)[0].startswith(("eval.", "parallel.")),
              f"{_line_of(src, 'eval_overrides')}: eval_overrides: {o!r}: expected eval.* or parallel.* overrides")

    grid_items = list(spec.grid.items())
    for k, vals in grid_items:
        _need(isinstance(vals, list) and vals, f"{_line_of(src, 'grid')}: grid.{k}: expected a non-empty list of values")

    def combos(items):
        if not items:
            yield {}
            return
        (k, vals), rest = items[0], items[1:]
        for v in vals:
            for c in combos(rest):
                yield {k: v, **c}

    tok_of = manifest_tokens or _manifest_tokens
    runs: List[Run] = []
    for size_name, model in sizes:
        for recipe in spec.recipes:
            rwhere = f"{_line_of(src, 'recipes')}: recipes[{spec.recipes.index(recipe)}]"
            stages = _recipe_stages(spec, recipe, rwhere, spec_dir)
            rname = os.path.splitext(os.path.basename(recipe))[0] if recipe.endswith((".yaml", ".yml")) else recipe
            refs = [r for _, _, data in stages for r, _ in data]
            recipe_uses_p = any(r in spec.datasets and ds_uses_p(r) for r in refs)
            for budget in spec.budgets:
                for p in (spec.p if recipe_uses_p else [None]):
                    for seed in spec.seeds:
                        for g in combos(grid_items):
                            runs.append(_make_run(spec, src, base_tree, size_name, model, rname, stages, budget, p,
                                                  seed, g, out_dir, rwhere, resolve_ref, tok_of))
    names = [r.name for r in runs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SweepError(f"{src}: two runs share a name {sorted(dup)[0]!r} (repeated axis values?)")
    # a run's datasets and their needs, transitively
    for r in runs:
        closure: List[str] = []

        def add(k):
            for n in instances[k].needs:
                add(n)
            if k not in closure:
                closure.append(k)
        for k in r.datasets:
            add(k)
        for k in bench_keys + valid_keys:
            add(k)
        r.datasets = closure
    for k, d in instances.items():
        if not d.build and not d.needs and not _exists(d):
            raise SweepError(f"{_line_of(src, k.split('@')[0])}: datasets.{k.split('@')[0]}: {d.prefix} does not exist "
                             "and has neither a build command nor needs that make it — no way to build it")
    return Sweep(spec, os.path.abspath(path), out_dir, data_dir, runs, instances, bench_paths, bench_keys, list(overrides))


def _manifest_tokens(prefix: str) -> Optional[int]:
    try:
        with open(prefix + ".manifest.json") as f:
            return int(json.load(f)["tokens"]["total"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _make_run(spec, src, base_tree, size_name, model, rname, stages, budget, p, seed, grid, out_dir, rwhere,
              resolve_ref, tok_of) -> Run:
    tree = _merge(base_tree, {"model": model})
    for k, v in grid.items():
        try:
            apply_override(tree, f"{k}={json.dumps(v) if not isinstance(v, str) else v}")
        except ConfigError as e:
            raise SweepError(f"{_line_of(src, 'grid')}: grid.{k}: {e}") from None
    parts = [size_name, rname, f"b{_fmt_num(budget)}"] + ([f"p{_fmt_num(p)}"] if p is not None else []) + \
        [f"{k.split('.')[-1]}{_fmt_num(v) if isinstance(v, (int, float)) else v}" for k, v in grid.items()] + [f"s{seed}"]
    name = ".".join(re.sub(r"[^A-Za-z0-9_+=-]", "-", str(x)) for x in parts)
    tree["name"] = name
    tree["output_dir"] = os.path.join(out_dir, "runs", name)
    tree["seed"] = seed
    tree.setdefault("data", {})["seed"] = seed
    tree["data"]["demo"] = False
    try:
        probe = config_from_dict({**tree, "schedule": {**tree["schedule"], "stages": [{"name": "x", "train_steps": 1}]},
                                  "data": {**tree["data"], "demo": True}})
    except ConfigError as e:
        raise SweepError(f"{src}: size {size_name}: {e}") from None
    if spec.matching == "tokens":
        tokens = int(budget)
    else:
        tokens = int(budget // flops_per_token(probe))
    fracs = [f for _, f, _ in stages]
    if any(f <= 0 for f in fracs):
        raise SweepError(f"{rwhere}: recipe {rname}: stage fractions must be positive")
    split = split_budget(tokens, fracs)
    tps = probe.tokens_per_step
    for (sname, _, _), t in zip(stages, split):
        if t < tps:
            what = f"budget {_fmt_num(budget)} {'tokens' if spec.matching == 'tokens' else 'FLOPs'}"
            raise SweepError(f"{_line_of(src, 'budgets')}: budgets: {what} cannot be matched for {size_name} x {rname}: "
                             f"stage {sname} would get {t:,} tokens, less than one step ({tps:,} tokens = "
                             "schedule.global_batch_size x model.seq_length)")
    keys, st_out = [], []
    for (sname, _, data), t in zip(stages, split):
        srcs = []
        for ref, w in data:
            key, prefix = resolve_ref(ref, p if p is not None else spec.p[0], f"{rwhere}: recipe {rname}: stage {sname}")
            if key:
                keys.append(key)
            if w == "tokens":
                n = tok_of(prefix)
                w = float(n) if n else 1.0     # a dataset not built yet: re-resolved after the build
                srcs.append({"path": prefix, "weight": w, "_tokens_weight": True})
            else:
                if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
                    raise SweepError(f"{rwhere}: recipe {rname}: stage {sname}: weight: expected a positive number or "
                                     f"'tokens', got {w!r}")
                srcs.append({"path": prefix, "weight": float(w)})
        st_out.append({"name": sname, "train_tokens": t, "data": srcs})
    tree["schedule"]["stages"] = [{k: v for k, v in s.items()} for s in st_out]
    for s in tree["schedule"]["stages"]:
        s["data"] = [{k: v for k, v in d.items() if not k.startswith("_")} for d in s["data"]]
    try:
        cfg = config_from_dict(tree).validate(world_size=spec.world_size)
    except ConfigError as e:
        raise SweepError(f"{src}: run {name}: {e}") from None
    cfg._tokens_weighted = [[bool(d.get("_tokens_weight")) for d in s["data"]] for s in st_out]  # type: ignore
    return Run(name, size_name, rname, budget, p, seed, dict(grid), cfg, split, list(dict.fromkeys(keys)))


def _exists(d: DatasetSpec) -> bool:
    if d.kind == "files":
        return os.path.exists(d.prefix)
    return os.path.exists(d.prefix + ".bin") and os.path.exists(d.prefix + ".idx")


# ------------------------------------------------------------------------------------------------
# Files of a sweep
# ------------------------------------------------------------------------------------------------
def atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run_config_path(sw: Sweep, run: Run) -> str:
    return os.path.join(sw.dir, "configs", f"{run.name}.yaml")


def refresh_token_weights(run: Run) -> None:
    """``weight: tokens`` sources take their built manifest's token total (after the data builds)."""
    flags = getattr(run.config, "_tokens_weighted", None) or []
    for st, fl in zip(run.config.schedule.stages, flags):
        for d, is_tok in zip(st.data, fl):
            if is_tok:
                n = _manifest_tokens(d.path)
                if n is None:
                    raise SweepError(f"run {run.name}: stage {st.name}: weight: tokens: {d.path}.manifest.json "
                                     "is missing (dataset not built)")
                d.weight = float(n)


def write_configs(sw: Sweep) -> List[str]:
    """One resolved run config per run, ``<sweep>/configs/<run>.yaml``, plus ``sweep.json`` (the expansion)."""
    paths = []
    for r in sw.runs:
        p = run_config_path(sw, r)
        new = r.config.to_yaml()
        old = open(p).read() if os.path.exists(p) else None
        if old != new:
            atomic_write(p, new)
        paths.append(p)
    atomic_write(os.path.join(sw.dir, "sweep.json"), json.dumps({
        "spec": sw.path, "overrides": sw.overrides, "dir": sw.dir, "matching": sw.spec.matching, "benchmarks": sw.benchmarks,
        "runs": [{"name": r.name, "size": r.size, "recipe": r.recipe, "arm": r.arm, "budget": r.budget, "p": r.p,
                  "seed": r.seed, "grid": r.grid, "params": r.config.num_parameters(), "tokens": r.tokens,
                  "stage_tokens": r.stage_tokens, "flops": r.flops(), "dir": r.dir, "config": run_config_path(sw, r)}
                 for r in sw.runs]}, indent=1))
    return paths


# ------------------------------------------------------------------------------------------------
# Plan
# ------------------------------------------------------------------------------------------------
def _human(n: float) -> str:
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def plan_rows(sw: Sweep) -> List[Dict]:
    t = sw.spec.throughput
    ref = next((r for r in sw.runs if r.size == t.reference), None)
    if ref is not None:
        ref_fpt = flops_per_token(ref.config)
    elif t.reference in PRESETS:
        ref_fpt = flops_per_token(config_from_dict(_merge(RunConfig().to_dict(), {
            "model": _read_tree(os.path.join(ROOT, PRESETS[t.reference]), ()).get("model", {}),
            "data": {"demo": True}})))
    else:
        raise SweepError(f"throughput.reference: {t.reference!r} is neither a size of this sweep nor a preset")
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
    t = sw.spec.throughput
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"{len(rows)} runs; matching: {sw.spec.matching} (every arm of one budget trains on exactly the "
                 f"{'same tokens' if sw.spec.matching == 'tokens' else 'same FLOPs, 6N + 12LHS per token'}); "
                 f"total {sum(r['flops'] for r in rows):.3e} FLOPs, {sum(r['device_hours'] for r in rows):.2f} "
                 f"device-hours at {t.tokens_per_s:,.0f} tokens/s on {t.device} for {t.reference} "
                 "(other sizes at the same FLOP/s)")
    where = (f"against {gpu:g} GiB per GPU ({'throughput.gpu_memory_gib' if t.gpu_memory_gib is not None else t.device})"
             if gpu is not None else "as on CPU (no GPU named in throughput.device: no verdict)")
    short = sum(1 for r in rows if r["fits"] is False)
    lines.append(f"memory: the worst rank of each run at world size {sw.spec.world_size} (megaslm/memory.py: parameters, "
                 f"gradients, optimizer, activations in flight{', 1.5 GiB overhead' if gpu is not None else ''}) {where}"
                 + (f"; {short} run{'s' if short != 1 else ''} do{'es' if short == 1 else ''} not fit: check one with "
                    "`launchers/pretrain.py --config <run config> --dry-run --world-size N --gpu-memory GIB` "
                    "for the levers" if short else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Run state (read from the outputs of the processes)
# ------------------------------------------------------------------------------------------------
def newest_meta(run_dir: str) -> Optional[Dict]:
    d = os.path.join(run_dir, "checkpoints")
    best = None
    if os.path.isdir(d):
        for n in os.listdir(d):
            m = re.match(r"^step(\d{8})$", n)
            mp = os.path.join(d, n, "meta.json")
            if m and os.path.exists(mp) and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), mp)
    if best is None:
        return None
    with open(best[1]) as f:
        meta = json.load(f)
    meta["_path"] = os.path.dirname(best[1])
    return meta


def run_state(run: Run) -> Dict:
    """``{state: pending|partial|trained|evaluated, step, tokens_seen, checkpoint}``."""
    meta = newest_meta(run.dir)
    st = {"run": run.name, "state": "pending", "step": 0, "tokens_seen": 0, "checkpoint": None,
          "budget": run.tokens, "steps": run.config.total_steps()}
    if meta is None:
        return st
    st.update(step=meta.get("step", 0), tokens_seen=meta.get("tokens_seen", 0), checkpoint=meta["_path"])
    budgets = {s.name: s.train_tokens for s in run.config.schedule.stages}
    done = meta.get("tokens_seen") == run.tokens and all(
        meta.get("stage_tokens", {}).get(k) == v for k, v in budgets.items())
    st["state"] = "trained" if done else "partial"
    if done:
        res = os.path.join(run.dir, "evals", "results.json")
        if os.path.exists(res) and os.path.getmtime(res) >= os.path.getmtime(os.path.join(meta["_path"], "meta.json")):
            st["state"] = "evaluated"
    return st


def format_status(sw: Sweep) -> str:
    rows = [run_state(r) for r in sw.runs]
    w = max(len(r["run"]) for r in rows)
    lines = [f"{'run'.ljust(w)}  {'state':9s}  {'step':>12s}  tokens"]
    for r in rows:
        lines.append(f"{r['run'].ljust(w)}  {r['state']:9s}  {r['step']:>5,}/{r['steps']:<6,}  "
                     f"{r['tokens_seen']:,}/{r['budget']:,}")
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Execution of one run (the same function locally, in submitit's LocalExecutor and on SLURM)
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def file_lock(path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def _call(cmd: List[str], log_path: str, env: Optional[Dict[str, str]] = None, what: str = "",
          pass_fds: Tuple[int, ...] = ()) -> None:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or _env(), cwd=ROOT,
                             pass_fds=pass_fds)
    if rc != 0:
        tail = ""
        try:
            with open(log_path) as f:
                lines = [l.strip() for l in f if l.strip()]
            errs = [l for l in lines if l.startswith("error:")]
            tail = (errs or lines or [""])[-1]
        except OSError:
            pass
        raise SweepError(f"{what or cmd[0]} failed (exit {rc}; log {log_path}): {tail}")


def ensure_dataset(instances: Dict[str, DatasetSpec], key: str, data_dir: str, python: str = sys.executable,
                   log=print) -> None:
    """Build ``key`` (after its needs) once: an flock serialises concurrent runs, a ``.done`` marker
    written after a successful build (atomically) makes later calls no-ops."""
    d = instances[key]
    for n in d.needs:
        ensure_dataset(instances, n, data_dir, python, log)
    safe = re.sub(r"[^A-Za-z0-9_.=-]", "_", key)
    marker = os.path.join(data_dir, ".built", f"{safe}.done")
    if os.path.exists(marker) or (not d.build and _exists(d)):
        return
    with file_lock(os.path.join(data_dir, ".built", f"{safe}.lock")):
        if os.path.exists(marker):
            return
        if not d.build:
            if _exists(d):   # made by one of its needs
                atomic_write(marker, json.dumps({"made_by": d.needs, "time": time.time()}))
                return
            raise SweepError(f"datasets.{key}: {d.prefix} does not exist after building {d.needs} and has no build command")
        log(f"building dataset {key}: python -m data_tools {' '.join(d.build)}")
        t0 = time.time()
        _call([python, "-m", "data_tools"] + d.build, os.path.join(data_dir, "logs", f"{safe}.log"),
              what=f"data build {key}")
        if not _exists(d):
            raise SweepError(f"datasets.{key}: the build finished but {d.prefix} does not exist (prefix wrong?)")
        atomic_write(marker, json.dumps({"build": d.build, "seconds": time.time() - t0, "time": time.time()}))


def hostfile_from_slurm(path: str, gpus_per_node: int) -> Optional[str]:
    """A DeepSpeed hostfile (``host slots=N``) from the allocation's nodelist (``scontrol show hostnames``)."""
    nl = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nl:
        return None
    hosts = subprocess.run(["scontrol", "show", "hostnames", nl], capture_output=True, text=True,
                           check=True).stdout.split()
    atomic_write(path, "".join(f"{h} slots={max(gpus_per_node, 1)}\n" for h in hosts))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(cfg_path: str, python: str, gpus: int, nodes: int, hostfile: Optional[str],
                  port: Optional[int] = None) -> List[str]:
    """The trainer's command line; runs of one node never share a rendezvous port (``port``)."""
    script = os.path.join(ROOT, "launchers", "pretrain.py")
    mp = ["--master_port", str(port)] if port else []
    if nodes > 1 and hostfile:
        return [python, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, "--num_gpus", str(gpus),
                *mp, "--no_local_rank", script, "--config", cfg_path]
    if gpus > 1:
        return [python, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus), *mp, "--no_local_rank", script,
                "--config", cfg_path]
    return [python, script, "--config", cfg_path]


def execute_run(sweep_json: str, name: str, python: Optional[str] = None, gpus: int = 0, nodes: int = 1,
                devices: Optional[str] = None, lock_wait: float = 30.0) -> Dict:
    """Data (built once, shared) -> training (resumes by itself; skipped when the budget is complete)
    -> evaluation of the final checkpoint. Idempotent; returns the run's state. ``lock_wait``: seconds to
    wait for a run held by another process before refusing it (a just-killed holder may take a moment to
    exit and release it)."""
    if nodes > 1 and int(os.environ.get("SLURM_PROCID", "0")) > 0:
        # a job of several nodes runs this once per node (one task each); the first task starts deepspeed
        # on every node of the allocation over its hostfile, the others have nothing to do
        return {}
    python = python or sys.executable
    with open(sweep_json) as f:
        sj = json.load(f)
    sw = expand(sj["spec"], sj.get("overrides", []), sj["dir"])
    run = next((r for r in sw.runs if r.name == name), None)
    if run is None:
        raise SweepError(f"run {name}: not in the sweep spec any more")
    logs = os.path.join(run.dir, "logs")
    # One process per run at a time. The lock's descriptor is handed to the trainer and the evaluator
    # (pass_fds), so it stays held while they live even if this process is killed: a second sweep
    # started meanwhile refuses the run instead of training it twice into the same directory.
    os.makedirs(run.dir, exist_ok=True)
    lock = open(os.path.join(run.dir, ".sweep.lock"), "a")
    deadline = time.time() + lock_wait
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() < deadline:
                time.sleep(0.5)
                continue
        lock.close()
        raise SweepError(f"run {name}: another process is running it (lock {run.dir}/.sweep.lock); "
                         "run the sweep again when it has finished") from None
    try:
        return _execute_locked(sw, run, name, python, gpus, nodes, devices, logs, (lock.fileno(),))
    finally:
        lock.close()


def _execute_locked(sw: Sweep, run: Run, name: str, python: str, gpus: int, nodes: int, devices: Optional[str],
                    logs: str, fds: Tuple[int, ...]) -> Dict:
    for k in run.datasets:
        ensure_dataset(sw.datasets, k, sw.data_dir, python, log=lambda m: None)
    refresh_token_weights(run)
    cfg_path = run_config_path(sw, run)
    atomic_write(cfg_path, run.config.to_yaml())
    env = _env()
    for kv in sw.spec.executor.env:
        k, _, v = kv.partition("=")
        env[k] = v
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    st = run_state(run)
    if st["state"] == "partial" or st["state"] == "pending":
        hf = hostfile_from_slurm(os.path.join(run.dir, "hostfile"), gpus) if nodes > 1 else None
        port = free_port()
        env["MASTER_PORT"] = str(port)   # a single process picks its rendezvous from here; deepspeed from --master_port
        _call(train_command(cfg_path, python, gpus, nodes, hf, port), os.path.join(logs, "train.log"), env,
              f"training {name}", fds)
        st = run_state(run)
        if st["state"] not in ("trained", "evaluated"):
            raise SweepError(f"training {name} stopped at {st['tokens_seen']:,} of {run.tokens:,} tokens "
                             f"(pre-empted? re-run the sweep to resume); log {os.path.join(logs, 'train.log')}")
    if st["state"] == "trained" and sw.benchmarks:
        out = os.path.join(run.dir, "evals")
        tmp = out + ".tmp"
        if os.path.isdir(tmp):
            import shutil
            shutil.rmtree(tmp)
        env["MASTER_PORT"] = str(free_port())   # launchers/eval.py alone would take 29500: parallel runs collide
        _call([python, os.path.join(ROOT, "launchers", "eval.py"), "--checkpoint", st["checkpoint"],
               "--benchmarks", *sw.benchmarks, "--out", tmp, *sw.spec.eval_overrides],
              os.path.join(logs, "eval.log"), env, f"evaluation {name}", fds)
        if os.path.isdir(out):
            import shutil
            shutil.rmtree(out)
        os.replace(tmp, out)
        st = run_state(run)
    return st
