"""Who may import whom (ARCHITECTURE.md), checked on the source: a walk over every import statement
(module level and inside functions alike: a lazy import is still a dependency), in both directions,
plus a search for import circles among the project's own modules."""
import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = set(sys.stdlib_module_names)
PACKAGES = ("megaslm", "kernels", "data_tools", "evals", "launchers")


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _project_modules():
    """{module name: file} for every .py file of the project's packages."""
    out = {}
    for package in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    out[_module_name(path)] = path
    return out


MODULES = _project_modules()


def _imported_names(path):
    """Every module name an import statement in ``path`` names, resolved to absolute names:
    ``from a.b import c`` gives ``a.b.c`` when that is a module, else ``a.b``; relative imports are
    resolved against the file's package; the launchers' ``from _common import`` (Python puts a
    script's own folder first on sys.path) is ``launchers._common``."""
    me = _module_name(path)
    package = me if path.endswith("__init__.py") else me.rpartition(".")[0]
    tree = ast.parse(open(path).read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            if me.startswith("launchers.") and mod and mod.split(".")[0] + ".py" in os.listdir(
                    os.path.join(ROOT, "launchers")):
                mod = "launchers." + mod
            for a in node.names:
                full = f"{mod}.{a.name}"
                out.append(full if full in MODULES else mod)
    return out


def imports_of(package):
    """(file, top-level module, full module) for every import in a package's .py files."""
    out = []
    for name, path in sorted(MODULES.items()):
        if name == package or name.startswith(package + "."):
            for n in _imported_names(path):
                out.append((os.path.relpath(path, ROOT), n.split(".")[0], n))
    if package not in PACKAGES:  # e.g. tests: not in the module table
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    out += [(os.path.relpath(path, ROOT), n.split(".")[0], n) for n in _imported_names(path)]
    return out


def _project_target(name):
    """The project module an imported name lands in (its deepest existing module), or None."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


def import_graph():
    graph = {m: set() for m in MODULES}
    for m, path in MODULES.items():
        for n in _imported_names(path):
            t = _project_target(n)
            if t is not None and t != m:
                graph[m].add(t)
    return graph


def import_circles(graph):
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def test_no_import_circles():
    circles = import_circles(import_graph())
    assert not circles, "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in circles)


def test_circle_finder_finds_circles():
    """The finder itself: a planted 3-cycle and a 2-cycle are found, a chain is not."""
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "f"}, "f": set(), "g": {"a"}}
    assert sorted(map(sorted, import_circles(g))) == [["a", "b", "c"], ["d", "e"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_import_resolution_sees_relative_and_from_imports():
    assert _project_target("megaslm.config.ConfigError") == "megaslm.config"
    graph = import_graph()
    assert "megaslm.config" in graph["megaslm.train"]
    assert "launchers._common" in graph["launchers.pretrain"]


def test_kernels_import_only_torch_and_triton():
    allowed = STDLIB | {"torch", "triton", "kernels", "numpy"}
    bad = [(f, m) for f, m, _ in imports_of("kernels") if m not in allowed]
    # numpy only in the benchmark scripts
    bad += [(f, m) for f, m, _ in imports_of("kernels") if m == "numpy" and "/bench/" not in f]
    assert not bad, bad


def test_config_vocab_and_fsutil_are_torch_free():
    # vocab.py may also import xxhash (a small C extension, no torch): the dataset content hash that
    # data_tools writes and training verifies; fsutil (the one atomic write) is standard library only
    light = {"megaslm/config.py": {"yaml", "megaslm"}, "megaslm/config_io.py": {"yaml", "megaslm"},
             "megaslm/vocab.py": {"yaml", "megaslm", "xxhash"}, "megaslm/fsutil.py": set(),
             "megaslm/figures.py": {"matplotlib", "megaslm"},   # the eval and sweep figures: no torch
             "megaslm/progress.py": {"tqdm"}}   # every long command's progress (tqdm on a TTY only)
    for f, m, full in imports_of("megaslm"):
        if f in light:
            assert m in STDLIB | light[f], (f, full)
            if m == "megaslm":
                assert full in ("megaslm.vocab", "megaslm.config", "megaslm.fsutil"), (f, full)


def test_megaslm_only_looks_down():
    """The library never imports the packages built on it: evals, data_tools, launchers (megaslm/sweeps sits
    above the library: its edges are test_sweeps_sit_above_the_library's)."""
    bad = [(f, full) for f, m, full in imports_of("megaslm") if m in ("evals", "data_tools", "launchers")
           and not f.startswith("megaslm/sweeps/")]
    assert not bad, bad


def test_data_tools_never_import_model_or_training():
    for f, m, full in imports_of("data_tools"):
        if m == "megaslm":
            # only the torch-free modules (unit vocabulary, manifest format, config, the atomic write, the
            # environment check, the progress report)
            assert full in ("megaslm", "megaslm.vocab", "megaslm.config", "megaslm.fsutil", "megaslm.deps",
                            "megaslm.progress"), (f, full)
        assert m not in ("deepspeed", "evals", "launchers"), (f, full)


def test_evals_never_import_training():
    for f, m, full in imports_of("evals"):
        assert not full.startswith("megaslm.train") and full != "megaslm.run", (f, full)
        assert m != "launchers", (f, full)


def test_nothing_imports_launchers():
    for package in ("megaslm", "kernels", "data_tools", "evals", "tests"):
        if os.path.isdir(os.path.join(ROOT, package)):
            for f, m, full in imports_of(package):
                assert m != "launchers", (f, full)


def test_megaslm_model_layer_does_not_import_training():
    for f, m, full in imports_of("megaslm"):
        if f in ("megaslm/model.py", "megaslm/layers.py", "megaslm/sharding.py", "megaslm/parallel.py",
                 "megaslm/data.py", "megaslm/cpu_compat.py", "megaslm/ds_adapter.py"):
            assert full not in ("megaslm.train", "megaslm.run"), (f, full)


# ------------------------------------------------------------------------------------------------
# The checkpoint package owns the run directory (ARCHITECTURE.md "Where things live")
# ------------------------------------------------------------------------------------------------
def _source_files(*packages):
    """(path relative to ROOT, text) of every .py file of ``packages`` (tests are not among them)."""
    for package in packages:
        for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
            for f in sorted(files):
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    yield os.path.relpath(path, ROOT), open(path).read()


def test_checkpoint_layout_is_torch_free():
    """The sweep, evals' listing and any tool may ask ``layout`` (and ``lock``) about a run directory
    without torch."""
    code = ("import megaslm.checkpoint.layout, megaslm.checkpoint.lock, megaslm.deps, sys; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for module in ("megaslm.checkpoint.layout", "megaslm.checkpoint.lock", "megaslm.ports", "megaslm.deps"):
        for f, m, full in imports_of(module):
            assert m in STDLIB or full in ("megaslm.config", "megaslm.fsutil"), (f, full)


# A tag's spelling or parsing: a ``step\d``/``step(\d`` regex, an f-string or format spelling
# ``"step{``/``step{...08d}``/``"step%``, or a literal tag such as step00000000.
TAG_SPELLING = re.compile(r"""step\(?\\d|["']step\{|step\{[^}]*08d|["']step%|step\d{8}""")
TAG_OWNER = "megaslm/checkpoint/layout.py"


def test_only_checkpoint_layout_spells_a_tag():
    bad = []
    for f, text in _source_files(*PACKAGES):
        if f == TAG_OWNER:
            continue
        bad += [f"{f}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1) if TAG_SPELLING.search(line)]
    assert not bad, "a checkpoint tag spelled or parsed outside megaslm/checkpoint/layout.py:\n" + "\n".join(bad)


def test_tag_spelling_finder_finds_spellings():
    for planted in ('m = re.match(r"^step(\\d{8})$", n)', 'tag = f"step{step:08d}"', '"step{:08d}".format(s)',
                    'os.path.join(d, "step00000000")', 'f"{d}/step{n:08d}.items.jsonl"', '"step%08d" % s'):
        assert TAG_SPELLING.search(planted), planted
    for fine in ('log(f"step {step}: loss")', 'steps = cfg.total_steps()', '"step": 3'):
        assert not TAG_SPELLING.search(fine), fine


# Attribute access ``<base>._name`` where ``<base>`` names a DeepSpeed engine, optimizer, scheduler or a
# parameter DeepSpeed annotated; and getattr/setattr/hasattr of a private name on one.
DS_OBJECTS = r"(?:engine|model_engine|ds_engine|optimizer|opt|zo|base|scheduler|sched|lr_scheduler|p|param|lp)"
DS_PRIVATE_ACCESS = re.compile(rf"""\b{DS_OBJECTS}\._[a-z]\w*|\b(?:get|set|has)attr\(\s*{DS_OBJECTS}\s*,\s*["']_[a-z]""")
DS_ADAPTER = "megaslm/ds_adapter.py"


def _ds_adapter_private_names():
    """The private names ds_adapter declares it relies on (module-level string constants ``"_x..."``)."""
    tree = ast.parse(open(os.path.join(ROOT, DS_ADAPTER)).read())
    return {n.value.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, str) and re.fullmatch(r"_[a-z]\w*", n.value.value)}


def test_deepspeed_privates_only_in_ds_adapter():
    names = _ds_adapter_private_names()
    assert {"_global_grad_norm", "_hp_mapping", "_lazy_init_hp_params_optimizer_state", "_last_lr"} <= names, names
    by_name = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(names))) + r")\b")
    bad = []
    for f, text in _source_files("megaslm", "evals", "launchers"):
        if f == DS_ADAPTER:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if DS_PRIVATE_ACCESS.search(line) or by_name.search(line):
                bad.append(f"{f}:{i}: {line.strip()}")
    assert not bad, "DeepSpeed private attributes outside megaslm/ds_adapter.py:\n" + "\n".join(bad)


def test_deepspeed_private_finder_finds_accesses():
    for planted in ("zo._lazy_init_hp_params_optimizer_state()", "if p._hp_mapping is None:",
                    "self.engine._global_grad_norm = n", "scheduler._last_lr = lrs",
                    "trainer.engine.optimizer._hp_optimizer_states_linked = False",
                    'getattr(engine, "_global_grad_norm")'):
        assert DS_PRIVATE_ACCESS.search(planted), planted
    for fine in ("self._log(msg)", "trainer._last_saved = 3", "engine.global_steps = 2", "torch._foreach_norm(g)",
                 "self._datasets.clear()", "engine.optimizer.zero_grad()"):
        assert not DS_PRIVATE_ACCESS.search(fine), fine


# ------------------------------------------------------------------------------------------------
# Sweeps sit above the rest of megaslm (ARCHITECTURE.md "Where things live")
# ------------------------------------------------------------------------------------------------
# what megaslm.sweeps takes from below: the config, the FLOPs formula, the plan's memory column, the
# checkpoint layout and the run directory's lock (run state) and evals' torch-free task names (the
# report's columns) and cross-lingual matrices (evals.xling: results dicts -> N x N tables and heatmaps, the
# same for one eval run and for a sweep's arms)
SWEEPS_MAY_IMPORT = ("megaslm.config", "megaslm.config_io", "megaslm.telemetry", "megaslm.memory",
                     "megaslm.checkpoint.layout", "megaslm.checkpoint.lock", "megaslm.fsutil", "megaslm.ports",
                     "evals.benchmarks", "megaslm.figures", "evals.xling",
                     "megaslm.progress")   # the runs-done progress lines


def test_sweeps_sit_above_the_library():
    """Nothing in megaslm outside megaslm/sweeps (nor kernels, data_tools, evals) imports megaslm.sweeps;
    megaslm.sweeps imports from the project only SWEEPS_MAY_IMPORT and its own modules."""
    for package in ("megaslm", "kernels", "data_tools", "evals"):
        for f, m, full in imports_of(package):
            if not f.startswith("megaslm/sweeps/"):
                assert not (full == "megaslm.sweeps" or full.startswith("megaslm.sweeps.")), (f, full)
    own = [(f, full) for f, m, full in imports_of("megaslm.sweeps")]
    assert own, "megaslm/sweeps not found"
    for f, full in own:
        if full.split(".")[0] in PACKAGES:
            assert full.startswith("megaslm.sweeps.") or full in SWEEPS_MAY_IMPORT, (f, full)
