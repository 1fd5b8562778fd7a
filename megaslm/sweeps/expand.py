"""A spec -> its runs: sizes (presets, depth/width, the size ladder searched by parameter count), recipes
(built in, custom or a run config's stage ratios), the axes, datasets instantiated per ``{p}``, and the
matching of every arm of a budget by tokens or by FLOPs (the telemetry's 6N + 12LHS per token).

No file is written here (``state.write_configs`` writes the resolved run configs and ``sweep.json``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from megaslm.config import ConfigError, RunConfig
from megaslm.config_io import _merge, _read_tree, apply_override, config_from_dict
from megaslm.telemetry import flops_per_token  # torch-free at import: the telemetry's own 6N + 12LHS formula
from megaslm.sweeps.recipes import apply_templates
from megaslm.sweeps.spec import (BUILTIN_RECIPES, DATA_TOOLS_COMMANDS, PRESETS, DatasetSpec, SweepError, SweepSpec,
                                 build_words, check_spec, fmt_num, line_of, load_spec, need, repo_root, subst)


@dataclass
class Dataset:
    """A dataset as the runs need it: ``{p}`` resolved, its build as the command to run and where."""
    prefix: str
    kind: str = "indexed"
    needs: List[str] = field(default_factory=list)    # instance keys to build first
    command: Optional[List[str]] = None                # argv; None: made by its needs, or must exist
    cwd: Optional[str] = None

    def exists(self) -> bool:
        if self.kind == "files":
            return os.path.exists(self.prefix)
        return os.path.exists(self.prefix + ".bin") and os.path.exists(self.prefix + ".idx")


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
    datasets: List[str]            # dataset instance keys this run needs (with their needs)
    # per stage, per source: whether its weight is the built manifest's token total (weight: tokens)
    tokens_weighted: List[List[bool]] = field(default_factory=list)

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
    datasets: Dict[str, Dataset]          # every instance ({p} resolved) of every dataset of the spec
    benchmarks: List[str]                 # resolved paths
    bench_datasets: List[str]
    overrides: List[str] = field(default_factory=list)
    python: str = sys.executable          # the jobs' interpreter (executor.python, else this one)


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------
def preset_model(name: str) -> Dict[str, Any]:
    return dict(_read_tree(os.path.join(repo_root(), PRESETS[name]), ()).get("model", {}))


def _size_model(entry: Any, where: str, base_tree: Dict) -> List[Tuple[str, Dict[str, Any]]]:
    """A size entry -> [(name, model section overrides)]."""
    if isinstance(entry, str):
        if entry not in PRESETS:
            raise SweepError(f"{where}: unknown size {entry!r}; expected a preset ({', '.join(PRESETS)}), a mapping "
                             "{name, num_layers, hidden_size, ...} or {ladder: ...}")
        return [(entry, preset_model(entry))]
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
    if "params" in spec:
        aspect = spec.get("aspect", 32)
        out = []
        for i, n in enumerate(spec["params"]):
            try:
                n = float(n)
            except (TypeError, ValueError):
                raise SweepError(f"{where}.params[{i}]: expected a parameter count, got {n!r}") from None
            model = _nearest_shape(n, aspect, hd, f"{where}.params[{i}]", base_tree)
            out.append((f"L{model['num_layers']}H{model['hidden_size']}", model))
        return out
    if "layers" in spec and "hidden" in spec:
        Ls, Hs = spec["layers"], spec["hidden"]
        if not isinstance(Ls, list) or not isinstance(Hs, list) or len(Ls) != len(Hs):
            raise SweepError(f"{where}: layers and hidden: expected two lists of the same length")
        return [(f"L{L}H{h}", _shape({"num_layers": L, "hidden_size": h, "head_dim": hd}, where)) for L, h in zip(Ls, Hs)]
    raise SweepError(f"{where}: expected params: [...] or layers: [...] with hidden: [...]")


def _nearest_shape(n: float, aspect: float, hd: int, where: str, base_tree: Dict) -> Dict[str, Any]:
    """The depth (1..64) whose width ``aspect x depth`` (a multiple of head_dim) comes nearest to ``n``
    parameters (in log distance); an error beyond 2x."""
    best = None
    for L in range(1, 65):
        h = max(hd, int(round(aspect * L / hd)) * hd)
        model = _shape({"num_layers": L, "hidden_size": h, "head_dim": hd}, where)
        cfg = _model_cfg(base_tree, model, where)
        err = abs(math.log(cfg.num_parameters() / n))
        if best is None or err < best[0]:
            best = (err, model, cfg.num_parameters())
    if best[0] > math.log(2):
        raise SweepError(f"{where}: no depth/width at aspect {aspect} comes within 2x of {n:g} "
                         f"parameters (nearest {best[2]:,})")
    return best[1]


def _model_cfg(base_tree: Dict, model: Dict[str, Any], where: str) -> RunConfig:
    tree = _merge(base_tree, {"model": model})
    try:
        return config_from_dict(tree)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None


def _sizes(spec: SweepSpec, src: str, base_tree: Dict) -> List[Tuple[str, Dict]]:
    sizes: List[Tuple[str, Dict]] = []
    for i, entry in enumerate(spec.sizes):
        sizes += _size_model(entry, f"{line_of(src, 'sizes')}: sizes[{i}]", base_tree)
    names = [s[0] for s in sizes]
    dup = {n for n in names if names.count(n) > 1}
    need(not dup, f"{line_of(src, 'sizes')}: sizes: duplicate size name(s) {sorted(dup)}")
    need(spec.throughput.reference in names or spec.throughput.reference in PRESETS,
         f"{line_of(src, 'throughput')}: throughput.reference: {spec.throughput.reference!r} is neither a size of "
         f"this sweep ({', '.join(names)}) nor a preset ({', '.join(PRESETS)})")
    return sizes


# ------------------------------------------------------------------------------------------------
# Recipes and budgets
# ------------------------------------------------------------------------------------------------
def _recipe_stages(spec: SweepSpec, name: str, where: str, spec_dir: str):
    """-> [(stage name, fraction, [(dataset or path, weight)])]."""
    if name in spec.custom_recipes:
        r = spec.custom_recipes[name]
        if not r.stages:
            raise SweepError(f"custom_recipes.{name}.stages: expected at least one stage")
        return [(st.name or f"stage{i}", st.fraction, [(d.dataset, d.weight) for d in st.data])
                for i, st in enumerate(r.stages)]
    if name in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[name]
    if name.endswith((".yaml", ".yml")):
        return _run_config_recipe(spec, name, where, spec_dir)
    raise SweepError(f"{where}: unknown recipe {name!r}; expected one of {', '.join(BUILTIN_RECIPES)}, a name under "
                     "custom_recipes, or a run config path (.yaml)")


def _run_config_recipe(spec: SweepSpec, name: str, where: str, spec_dir: str):
    """A run config's stages as a recipe: their train_tokens ratios split the budget."""
    path = name if os.path.isabs(name) else os.path.join(spec_dir, name)
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


def read_manifest_tokens(prefix: str) -> Optional[int]:
    try:
        with open(prefix + ".manifest.json") as f:
            return int(json.load(f)["tokens"]["total"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def refresh_token_weights(run: Run) -> bool:
    """``weight: tokens`` sources take their built manifest's token total (after the data builds);
    returns whether a weight changed."""
    changed = False
    for st, fl in zip(run.config.schedule.stages, run.tokens_weighted):
        for d, is_tok in zip(st.data, fl):
            if is_tok:
                n = read_manifest_tokens(d.path)
                if n is None:
                    raise SweepError(f"run {run.name}: stage {st.name}: weight: tokens: {d.path}.manifest.json "
                                     "is missing (dataset not built)")
                changed |= d.weight != float(n)
                d.weight = float(n)
    return changed


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------
class _Datasets:
    """The spec's datasets, instantiated on demand per ``{p}`` value (``name`` or ``name@p<p>``)."""

    def __init__(self, spec: SweepSpec, src: str, spec_dir: str, data_dir: str, python: str):
        self.spec, self.src, self.spec_dir, self.data_dir, self.python = spec, src, spec_dir, data_dir, python
        self.instances: Dict[str, Dataset] = {}

    def uses_p(self, name: str, seen: Tuple[str, ...] = ()) -> bool:
        d = self.spec.datasets[name]
        return "{p}" in " ".join(build_words(d)) or any(
            self.uses_p(n, seen + (name,)) for n in d.needs if n not in seen and n in self.spec.datasets)

    def inst(self, name: str, p: Optional[float], where: str) -> str:
        """Instantiate dataset ``name`` at ``p`` (and its needs); returns the instance key."""
        if name not in self.spec.datasets:
            raise SweepError(f"{where}: dataset {name!r} is not defined under datasets "
                             f"(defined: {', '.join(self.spec.datasets) or 'none'})")
        d = self.spec.datasets[name]
        key = f"{name}@p{fmt_num(p)}" if self.uses_p(name) else name
        if key in self.instances:
            return key
        needs = [self.inst(n, p, f"datasets.{name}.needs") for n in d.needs]
        kw = self._placeholders(d, p)
        prefix = subst(d.prefix, f"datasets.{name}.prefix", **kw)
        if not os.path.isabs(prefix):
            prefix = os.path.join(self.spec_dir, prefix)
        command, cwd = self._command(d, name, p)
        self.instances[key] = Dataset(prefix=prefix, kind=d.kind, needs=needs, command=command, cwd=cwd)
        return key

    def _placeholders(self, d: DatasetSpec, p: Optional[float], quote=lambda s: s) -> Dict[str, str]:
        # {root} only where used: a spec that never names the repository needs none (non-editable install)
        root = repo_root() if "{root}" in " ".join(build_words(d)) else ""
        return dict(data=quote(self.data_dir), p=fmt_num(p) if p is not None else "", root=quote(root),
                    python=quote(self.python))

    def _command(self, d: DatasetSpec, name: str, p: Optional[float]) -> Tuple[Optional[List[str]], Optional[str]]:
        """A build -> (argv, working directory): data_tools arguments run ``python -m data_tools`` in the
        repository (as before any command could be given); a command of its own runs in the spec's folder."""
        where = f"datasets.{name}.build"
        if d.build is None:
            return None, None
        if isinstance(d.build, str):
            import shlex

            kw = self._placeholders(d, p, quote=shlex.quote)
            return ["/bin/sh", "-c", subst(d.build, where, **kw)], self.spec_dir
        kw = self._placeholders(d, p)
        args = [subst(a, where, **kw) for a in d.build]
        if args[0] in DATA_TOOLS_COMMANDS:
            try:
                cwd = repo_root()
            except SweepError:
                cwd = self.spec_dir   # data_tools is an installed package: it needs no checkout
            return [self.python, "-m", "data_tools"] + args, cwd
        return args, self.spec_dir

    def resolve_ref(self, ref: str, p: float, where: str) -> Tuple[Optional[str], str]:
        """A recipe's data reference: a dataset name -> (key, prefix); else an existing built path."""
        if ref in self.spec.datasets:
            k = self.inst(ref, p, where)
            return k, self.instances[k].prefix
        path_ = ref if os.path.isabs(ref) else os.path.join(self.spec_dir, ref)
        if os.path.exists(path_ + ".bin") or os.path.exists(path_ + ".manifest.json"):
            return None, path_
        raise SweepError(f"{where}: data {ref!r} is neither a dataset of this spec (datasets: "
                         f"{', '.join(self.spec.datasets) or 'none'}) nor a built dataset at {path_} — no way to build it")

    def closure(self, keys: Sequence[str]) -> List[str]:
        """``keys`` with their needs, transitively, needs first."""
        out: List[str] = []

        def add(k):
            for n in self.instances[k].needs:
                add(n)
            if k not in out:
                out.append(k)
        for k in keys:
            add(k)
        return out

    def check_buildable(self) -> None:
        for k, d in self.instances.items():
            if not d.command and not d.needs and not d.exists():
                name = k.split("@")[0]
                raise SweepError(f"{line_of(self.src, name)}: datasets.{name}: {d.prefix} does not exist "
                                 "and has neither a build command nor needs that make it — no way to build it")

    def instantiate_all(self) -> None:
        """Every dataset of the spec at every ``{p}`` it uses (what ``launchers/sweep.py data`` builds)."""
        for name in self.spec.datasets:
            for p in (self.spec.p if self.uses_p(name) else [self.spec.p[0]]):
                self.inst(name, p, f"datasets.{name}")


def _benchmarks(spec: SweepSpec, src: str, spec_dir: str, ds: _Datasets) -> Tuple[List[str], List[str]]:
    keys, paths = [], []
    for i, b in enumerate(spec.benchmarks):
        if b in spec.datasets:
            k = ds.inst(b, spec.p[0], f"benchmarks[{i}]")
            keys.append(k)
            paths.append(ds.instances[k].prefix)
        else:
            pth = b if os.path.isabs(b) else os.path.join(spec_dir, b)
            need(os.path.exists(pth), f"{line_of(src, 'benchmarks')}: benchmarks[{i}]: {b!r} is neither a dataset "
                                      f"of this spec nor an existing path")
            paths.append(pth)
    return keys, paths


def _valid(spec: SweepSpec, src: str, ds: _Datasets, base_tree: Dict) -> List[str]:
    """The held-out data of every run -> their dataset keys; sets eval.valid* in the base tree."""
    keys, paths = [], []
    for i, v in enumerate(spec.valid):
        k, pth = ds.resolve_ref(v, spec.p[0], f"{line_of(src, 'valid')}: valid[{i}]")
        if k:
            keys.append(k)
        paths.append(pth)
    if spec.valid:
        base_tree.setdefault("eval", {}).update(valid=paths, valid_interval=spec.valid_interval,
                                                valid_sequences=spec.valid_sequences)
    return keys


# ------------------------------------------------------------------------------------------------
# Expansion
# ------------------------------------------------------------------------------------------------
def _base_tree(spec: SweepSpec, src: str, spec_dir: str) -> Dict:
    base_path = spec.base if os.path.isabs(spec.base) else os.path.join(spec_dir, spec.base)
    if not os.path.isfile(base_path):
        raise SweepError(f"{line_of(src, 'base')}: base: run config {spec.base!r} not found (looked at {base_path})")
    try:
        tree = _merge(RunConfig().to_dict(), _read_tree(base_path, ()))
        for o in spec.overrides:
            apply_override(tree, o)
    except ConfigError as e:
        raise SweepError(f"{line_of(src, 'overrides')}: overrides: {e}") from None
    return tree


def expand(path: str, overrides: Sequence[str] = (), output_dir: Optional[str] = None,
           manifest_tokens: Optional[Callable[[str], Optional[int]]] = None) -> Sweep:
    """Load, validate and expand a spec into runs (no file written; see ``state.write_configs``).

    ``manifest_tokens(prefix) -> int | None`` reads a built dataset's token total (for ``weight:
    tokens``); the default reads ``<prefix>.manifest.json``."""
    spec = load_spec(path, overrides)
    src, spec_dir = path, os.path.dirname(os.path.abspath(path))
    check_spec(spec, src)
    out_dir = os.path.abspath(output_dir or spec.output_dir)
    data_dir = os.path.join(out_dir, "data")
    base_tree = _base_tree(spec, src, spec_dir)
    apply_templates(spec, src, base_tree)   # recipes over a language set -> their datasets and stages
    sizes = _sizes(spec, src, base_tree)
    ds = _Datasets(spec, src, spec_dir, data_dir, spec.executor.python or sys.executable)
    used_p = any(ds.uses_p(n) for n in spec.datasets)
    need(len(spec.p) == 1 or used_p, f"{line_of(src, 'p')}: p: several values but no dataset uses {{p}}")
    bench_keys, bench_paths = _benchmarks(spec, src, spec_dir, ds)
    valid_keys = _valid(spec, src, ds, base_tree)
    runs = _runs(spec, src, spec_dir, base_tree, sizes, out_dir, ds, manifest_tokens or read_manifest_tokens)
    for r in runs:
        r.datasets = ds.closure(r.datasets + bench_keys + valid_keys)
    ds.check_buildable()
    ds.instantiate_all()
    return Sweep(spec, os.path.abspath(path), out_dir, data_dir, runs, ds.instances, bench_paths, bench_keys,
                 list(overrides), ds.python)


def _combos(items):
    if not items:
        yield {}
        return
    (k, vals), rest = items[0], items[1:]
    for v in vals:
        for c in _combos(rest):
            yield {k: v, **c}


def _runs(spec, src, spec_dir, base_tree, sizes, out_dir, ds: _Datasets, tok_of) -> List[Run]:
    """Every combination of size x recipe x budget x p (where the recipe uses it) x seed x grid."""
    runs: List[Run] = []
    for size_name, model in sizes:
        for i, recipe in enumerate(spec.recipes):
            rwhere = f"{line_of(src, 'recipes')}: recipes[{i}]"
            stages = _recipe_stages(spec, recipe, rwhere, spec_dir)
            rname = os.path.splitext(os.path.basename(recipe))[0] if recipe.endswith((".yaml", ".yml")) else recipe
            refs = [r for _, _, data in stages for r, _ in data]
            recipe_uses_p = any(r in spec.datasets and ds.uses_p(r) for r in refs)
            for budget in spec.budgets:
                for p in (spec.p if recipe_uses_p else [None]):
                    for seed in spec.seeds:
                        for g in _combos(list(spec.grid.items())):
                            axes = _Axes(size_name, model, rname, stages, budget, p, seed, g, rwhere)
                            runs.append(_make_run(spec, src, base_tree, axes, out_dir, ds, tok_of))
    names = [r.name for r in runs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise SweepError(f"{src}: two runs share a name {sorted(dup)[0]!r} (repeated axis values?)")
    return runs


@dataclass
class _Axes:
    size: str
    model: Dict[str, Any]
    recipe: str
    stages: List
    budget: float
    p: Optional[float]
    seed: int
    grid: Dict[str, Any]
    where: str

    def name(self) -> str:
        parts = [self.size, self.recipe, f"b{fmt_num(self.budget)}"] + ([f"p{fmt_num(self.p)}"] if self.p is not None else [])
        parts += [f"{k.split('.')[-1]}{fmt_num(v) if isinstance(v, (int, float)) else v}" for k, v in self.grid.items()]
        return ".".join(re.sub(r"[^A-Za-z0-9_+=-]", "-", str(x)) for x in parts + [f"s{self.seed}"])


def _make_run(spec: SweepSpec, src: str, base_tree: Dict, ax: _Axes, out_dir: str, ds: _Datasets, tok_of) -> Run:
    tree = _merge(base_tree, {"model": ax.model})
    for k, v in ax.grid.items():
        try:
            apply_override(tree, f"{k}={json.dumps(v) if not isinstance(v, str) else v}")
        except ConfigError as e:
            raise SweepError(f"{line_of(src, 'grid')}: grid.{k}: {e}") from None
    name = ax.name()
    tree.update(name=name, output_dir=os.path.join(out_dir, "runs", name), seed=ax.seed)
    tree.setdefault("data", {}).update(seed=ax.seed, demo=False)
    try:
        probe = config_from_dict({**tree, "schedule": {**tree["schedule"], "stages": [{"name": "x", "train_steps": 1}]},
                                  "data": {**tree["data"], "demo": True}})
    except ConfigError as e:
        raise SweepError(f"{src}: size {ax.size}: {e}") from None
    split = _stage_split(spec, src, ax, probe)
    keys, stages, flags = [], [], []
    for (sname, _, data), t in zip(ax.stages, split):
        srcs, fl = _stage_sources(ax, sname, data, ds, keys, tok_of)
        stages.append({"name": sname, "train_tokens": t, "data": srcs})
        flags.append(fl)
    tree["schedule"]["stages"] = stages
    try:
        cfg = config_from_dict(tree).validate(world_size=spec.world_size)
    except ConfigError as e:
        raise SweepError(f"{src}: run {name}: {e}") from None
    return Run(name, ax.size, ax.recipe, ax.budget, ax.p, ax.seed, dict(ax.grid), cfg, split,
               list(dict.fromkeys(keys)), flags)


def _stage_split(spec: SweepSpec, src: str, ax: _Axes, probe: RunConfig) -> List[int]:
    """The run's tokens (the budget, or FLOPs / FLOPs per token) split over its stages; every stage at
    least one optimizer step."""
    tokens = int(ax.budget) if spec.matching == "tokens" else int(ax.budget // flops_per_token(probe))
    fracs = [f for _, f, _ in ax.stages]
    if any(f <= 0 for f in fracs):
        raise SweepError(f"{ax.where}: recipe {ax.recipe}: stage fractions must be positive")
    split = split_budget(tokens, fracs)
    tps = probe.tokens_per_step
    for (sname, _, _), t in zip(ax.stages, split):
        if t < tps:
            what = f"budget {fmt_num(ax.budget)} {'tokens' if spec.matching == 'tokens' else 'FLOPs'}"
            raise SweepError(f"{line_of(src, 'budgets')}: budgets: {what} cannot be matched for {ax.size} x "
                             f"{ax.recipe}: stage {sname} would get {t:,} tokens, less than one step ({tps:,} tokens "
                             "= schedule.global_batch_size x model.seq_length)")
    return split


def _stage_sources(ax: _Axes, sname: str, data, ds: _Datasets, keys: List[str], tok_of):
    """A stage's data references -> (run config sources, which weigh by their manifest's tokens)."""
    srcs, flags = [], []
    for ref, w in data:
        key, prefix = ds.resolve_ref(ref, ax.p if ax.p is not None else ds.spec.p[0],
                                     f"{ax.where}: recipe {ax.recipe}: stage {sname}")
        if key:
            keys.append(key)
        is_tok = w == "tokens"
        if is_tok:
            n = tok_of(prefix)
            w = float(n) if n else 1.0     # a dataset not built yet: re-resolved after the build
        elif isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
            raise SweepError(f"{ax.where}: recipe {ax.recipe}: stage {sname}: weight: expected a positive number or "
                             f"'tokens', got {w!r}")
        flags.append(is_tok)
        srcs.append({"path": prefix, "weight": float(w)})
    return srcs, flags
