"""The sweep spec: its schema (strict: unknown keys are errors, as in run configs), its loading with the
run config's strict YAML loader (a key given twice is an error, not a silent last-wins), the checks that
need no expansion, and where the repository's ``configs/`` and ``launchers/`` are.

The format is documented in docs/sweeps.md; ``configs/sweeps/demo.yaml`` is the embedded default.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megaslm.config import ConfigError
from megaslm.config_io import _build, apply_override, read_yaml_strict

# size presets: the model section of each run config (read from the repository's configs/)
PRESETS = {"tiny": "configs/tiny.yaml", "qwen2-360m": "configs/qwen2-360m.yaml",
           "llama3.2-1b": "configs/llama3.2-1b.yaml", "llama3.2-3b": "configs/llama3.2-3b.yaml",
           "llama3.1-8b": "configs/llama3.1-8b.yaml"}
MATCHING = ("tokens", "flops")
EXECUTORS = ("local", "slurm", "submitit-local")
# the subcommands of `python -m data_tools` (pinned against data_tools/cli.py by tests/sweep/test_spec.py):
# a dataset's build list that starts with one of them is data_tools arguments, any other list is a
# command of its own (argv), and a string is a shell command
DATA_TOOLS_COMMANDS = ("build", "adopt", "bpe-train", "bpe-encode", "budget", "inspect", "demo", "world", "tokenize",
                       "tokenize-kmeans-train", "tokenize-bench")
# what a sweep needs from the repository besides the installed packages
REPO_NEEDS = ("configs", os.path.join("launchers", "pretrain.py"), os.path.join("launchers", "eval.py"))
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SweepError(ConfigError):
    """A sweep spec or sweep state problem; the message names the field (one line)."""


def repo_root() -> str:
    """The checkout whose ``configs/`` and ``launchers/`` a sweep uses: ``$MEGASLM_ROOT``, else the one
    this package was imported from (a source or editable install), else the working directory.

    A non-editable ``pip install .`` ships the packages only: then one line says what is missing where."""
    looked = []
    for cand in (os.environ.get("MEGASLM_ROOT"), _PACKAGE_PARENT, os.getcwd()):
        if not cand or os.path.abspath(cand) in (c for c, _ in looked):
            continue
        cand = os.path.abspath(cand)
        missing = [n for n in REPO_NEEDS if not os.path.exists(os.path.join(cand, n))]
        if not missing:
            return cand
        looked.append((cand, missing))
    where = "; ".join(f"{c} (no {', '.join(m)})" for c, m in looked)
    raise SweepError(f"the sweep needs the repository's {', '.join(REPO_NEEDS)}, which a non-editable "
                     f"`pip install .` does not ship; looked in {where}: run it from a checkout, install with "
                     "`pip install -e .`, or set MEGASLM_ROOT to a checkout")


# ------------------------------------------------------------------------------------------------
# The spec tree
# ------------------------------------------------------------------------------------------------
@dataclass
class DatasetSpec:
    """A dataset the runs may need: ``prefix`` (an indexed dataset prefix, or a folder/file for ``kind:
    files``) and, when it may be missing, the ``build`` that makes it: ``python -m data_tools`` arguments
    (a list starting with a data_tools subcommand), any other command as a list (argv) or a string (run by
    the shell). ``{data}`` is the sweep's data folder, ``{p}`` the interleave probability axis, ``{root}``
    the repository, ``{python}`` the sweep's interpreter."""
    prefix: str = ""
    build: Any = None                                 # None | [data_tools args] | [argv] | "shell command"
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
    # a name (built in, custom_recipes, a run config path) or a template over languages (megaslm/sweeps/recipes.py)
    recipes: List[Any] = field(default_factory=list)
    budgets: List[float] = field(default_factory=list)
    matching: str = "tokens"                   # tokens | flops
    p: List[float] = field(default_factory=lambda: [0.5])
    seeds: List[int] = field(default_factory=lambda: [1234])
    overrides: List[str] = field(default_factory=list)
    grid: Dict[str, List[Any]] = field(default_factory=dict)   # a.b.c -> values: extra axes
    datasets: Dict[str, DatasetSpec] = field(default_factory=dict)
    custom_recipes: Dict[str, RecipeSpec] = field(default_factory=dict)
    # recipe templates ({name: interleaving, languages: [...]}): the languages they may name (and every run's
    # vocab.languages; default: the base config's), the stories they build from (a dataset of kind files
    # holding stories.jsonl, e.g. data_tools world, or a stories JSONL path) and arguments for their builds
    languages: List[str] = field(default_factory=list)
    stories: Optional[str] = None
    build_args: List[str] = field(default_factory=list)
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
# Loading
# ------------------------------------------------------------------------------------------------
def fmt_num(x: float) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e18:
        return str(int(x))
    return f"{x:g}"


def subst(text: str, where: str, **kw) -> str:
    try:
        return text.format(**kw)
    except (KeyError, IndexError, ValueError) as e:
        raise SweepError(f"{where}: {text!r}: unknown placeholder {e} "
                         "(expected {data}, {p}, {root}, {python})") from None


def read_spec_yaml(path: str) -> Dict:
    """The spec file as a tree, through the run config's strict loader (a repeated key is an error)."""
    tree = read_yaml_strict(path, f"{path}: sweep spec not found", SweepError)
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise SweepError(f"{path}: expected a mapping at the top level")
    return tree


def line_of(path: str, key: str) -> str:
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
    tree = read_spec_yaml(path)
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
        raise SweepError(f"{line_of(path, key)}: {msg}") from None
    for key, val in named.items():
        setattr(spec, key, val)
    return spec


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise SweepError(msg)


def check_spec(spec: SweepSpec, src: str) -> None:
    """The checks of the spec's own values (before any expansion)."""
    need(spec.matching in MATCHING, f"{line_of(src, 'matching')}: matching: expected tokens or flops, got {spec.matching!r}")
    need(bool(spec.recipes), f"{src}: recipes: expected at least one recipe")
    need(bool(spec.budgets), f"{src}: budgets: expected at least one token (or FLOPs) budget")
    need(bool(spec.sizes), f"{src}: sizes: expected at least one size")
    need(bool(spec.seeds), f"{src}: seeds: expected at least one seed")
    need(bool(spec.p) and all(0.0 <= x <= 1.0 for x in spec.p), f"{line_of(src, 'p')}: p: expected probabilities in [0, 1]")
    need(spec.world_size >= 1, f"{src}: world_size: expected an integer >= 1")
    ex = spec.executor
    need(ex.kind in EXECUTORS,
         f"{line_of(src, 'kind')}: executor.kind: expected local, slurm or submitit-local, got {ex.kind!r}")
    need(ex.parallel >= 1 and ex.gpus_per_run >= 0 and ex.nodes >= 1,
         f"{line_of(src, 'executor')}: executor: expected parallel >= 1, gpus_per_run >= 0, nodes >= 1")
    for kv in ex.env:
        need("=" in kv and kv.partition("=")[0].isidentifier(),
             f"{line_of(src, 'env')}: executor.env: expected KEY=VALUE, got {kv!r}")
    for i, b in enumerate(spec.budgets):
        need(b > 0 and (spec.matching == "flops" or float(b).is_integer()),
             f"{line_of(src, 'budgets')}: budgets[{i}]: expected a positive integer token count"
             f"{' (or FLOPs with matching: flops)' if spec.matching == 'tokens' else ''}, got {b!r}")
    need(spec.throughput.tokens_per_s > 0, f"{line_of(src, 'throughput')}: throughput.tokens_per_s: expected > 0")
    for o in spec.eval_overrides:
        need(o.split("=", 1)[0].startswith(("eval.", "parallel.")),
             f"{line_of(src, 'eval_overrides')}: eval_overrides: {o!r}: expected eval.* or parallel.* overrides")
    for k, vals in spec.grid.items():
        need(isinstance(vals, list) and bool(vals), f"{line_of(src, 'grid')}: grid.{k}: expected a non-empty list of values")
    need(bool(spec.valid) == (spec.valid_interval > 0),
         f"{line_of(src, 'valid' if spec.valid else 'valid_interval')}: "
         f"{'valid_interval: expected an integer >= 1 with valid' if spec.valid else 'valid: expected held-out datasets with valid_interval'}")
    for name, d in spec.datasets.items():
        check_dataset(d, f"{line_of(src, name)}: datasets.{name}", spec.datasets)


def check_dataset(d: DatasetSpec, where: str, defined: Dict[str, DatasetSpec]) -> None:
    need(bool(d.prefix), f"{where}.prefix: expected the dataset's prefix (or path)")
    need(d.kind in ("indexed", "files"), f"{where}.kind: expected indexed or files, got {d.kind!r}")
    for n in d.needs:
        need(n in defined, f"{where}.needs: {n!r} is not a dataset of this spec")
    b = d.build
    if b is None:
        return
    if isinstance(b, str):
        need(bool(b.strip()), f"{where}.build: expected a command, got an empty string")
        return
    need(isinstance(b, list) and bool(b) and all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                                 for x in b),
         f"{where}.build: expected data_tools arguments or a command (a list of strings, or one string), got {b!r}")
    d.build = [str(x) for x in b]


def build_words(d: DatasetSpec) -> List[str]:
    """Every word of a dataset's prefix and build (to see which placeholders it uses)."""
    b = d.build
    return [d.prefix] + ([b] if isinstance(b, str) else list(b or []))
