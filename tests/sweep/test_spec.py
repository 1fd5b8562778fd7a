"""Sweep specs: strict validation (one line naming the field, exit 2), expansion, matching, plan."""
import os
import time

import pytest
import yaml

from helpers import BUDGET, ROOT, sweep, tiny_spec

from megaslm.config_io import load_config
from megaslm.sweeps.expand import expand, split_budget
from megaslm.sweeps.plan import format_plan, plan_rows
from megaslm.sweeps.spec import SweepError
from megaslm.sweeps.state import write_configs
from megaslm.telemetry import flops_per_token


def _edit(path, fn):
    with open(path) as f:
        spec = yaml.safe_load(f)
    fn(spec)
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return path


BAD = [
    ("unknown axis", lambda s: s.update(sizez=["tiny"]), "sizez: unknown key"),
    ("unknown key in a dataset", lambda s: s["datasets"]["en"].update(prefx="x"), "datasets.en.prefx: unknown key"),
    ("budget cannot be matched", lambda s: s.update(budgets=[300]), "budgets"),
    ("recipe does not exist", lambda s: s.update(recipes=["en_fr", "interleavng"]), "unknown recipe 'interleavng'"),
    ("missing data, no build", lambda s: s["datasets"].pop("interleaved"), "data 'interleaved' is neither a dataset of this spec"),
    ("dataset path missing, no build", lambda s: s["datasets"].update(fr={"prefix": "{data}/fr"}), "no way to build it"),
    ("bad matching rule", lambda s: s.update(matching="steps"), "matching: expected tokens or flops"),
    ("wrong type", lambda s: s.update(seeds="one"), "seeds: expected a list"),
    ("bad size", lambda s: s.update(sizes=["huge"]), "unknown size 'huge'"),
    ("bad throughput reference", lambda s: s["throughput"].update(reference="xl"), "throughput.reference: 'xl'"),
    ("valid without an interval", lambda s: s.update(valid_interval=0), "valid_interval: expected an integer >= 1"),
    ("valid data unknown", lambda s: s.update(valid=["heldout"]), "valid[0]: data 'heldout' is neither a dataset"),
    ("valid sequences", lambda s: s.update(valid_sequences=3), "eval.valid_sequences: expected a positive multiple"),
]


@pytest.mark.parametrize("what,edit,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_spec_fails_fast_with_one_line(tmp_path, what, edit, needle):
    path = _edit(tiny_spec(tmp_path), edit)
    t0 = time.time()
    r = sweep("run", "--spec", path)
    took = time.time() - t0
    print(f"{what}: exit {r.returncode} after {took:.2f} s: {r.stderr.strip()}")
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    # nothing started: no sweep directory, no data build
    assert not os.path.exists(os.path.join(str(tmp_path), "sweep"))


def test_budget_under_one_step_is_refused_by_the_sweep_and_the_run_config_alike(tmp_path):
    """One rule for a stage of less than one step (4 x 64 = 256 tokens here): the sweep refuses the budget, a run
    config refuses the stage (megaslm.config: RunConfig.validate); one step is accepted by both."""
    from megaslm.config import ConfigError

    one_step = ["model.seq_length=64", "schedule.micro_batch_size=4", "schedule.global_batch_size=4", "data.demo=true"]
    for budget in (256, 255):
        spec = tiny_spec(tmp_path, sizes=[{"name": "xs", "num_layers": 1, "hidden_size": 32}], recipes=["en_fr"],
                         budgets=[budget])
        cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"),
                          one_step + [f"schedule.stages=[{{name: main, train_tokens: {budget}}}]"])
        if budget == 256:
            assert [r.config.schedule.stages[0].train_tokens for r in expand(spec).runs] == [256]
            cfg.validate(world_size=1)
            continue
        with pytest.raises(SweepError, match=r"stage en_fr would get 255 tokens, less than one step \(256 tokens = "
                                             r"schedule.global_batch_size x model.seq_length\)"):
            expand(spec)
        with pytest.raises(ConfigError, match=r"^schedule.stages\[0\].train_tokens: expected at least one step "
                                              r"\(256 tokens = schedule.global_batch_size x model.seq_length = 4 x 64\), "
                                              r"got 255$"):
            cfg.validate(world_size=1)


def test_expansion_matches_tokens_exactly(tmp_path):
    sw = expand(tiny_spec(tmp_path))
    assert len(sw.runs) == 4
    names = sorted(r.name for r in sw.runs)
    assert names == sorted(f"{s}.{r}.b{BUDGET}{'.p0-5' if r == 'interleaving' else ''}.s7"
                           for s in ("xs", "s") for r in ("en_fr", "interleaving"))
    for r in sw.runs:
        stages = r.config.schedule.stages
        assert sum(st.train_tokens for st in stages) == BUDGET
        if r.recipe == "interleaving":   # the paper's 75k/10k split of an 85k-step run
            assert [st.name for st in stages] == ["en_only", "interleaving"]
            assert abs(stages[1].train_tokens / BUDGET - 10 / 85) < 1e-3
            assert stages[1].data[0].path.endswith("inter_p0.5")
    paths = write_configs(sw)
    for p, r in zip(paths, sw.runs):   # every resolved config loads back as the same run config
        cfg = load_config(p)
        assert cfg.to_dict() == r.config.to_dict()
        assert cfg.output_dir.endswith(os.path.join("runs", r.name))
    # stable: a second expansion gives the same names and files
    assert [r.name for r in expand(tiny_spec(tmp_path)).runs] == [r.name for r in sw.runs]


def test_split_budget_is_exact():
    for total in (1, 7, 1000, 61_440_000_000, 12345):
        for fr in ([1], [75, 10], [0.75, 0.1, 0.0375, 0.0375, 0.0375, 0.0375], [1, 1, 1]):
            parts = split_budget(total, fr)
            assert sum(parts) == total and all(p >= 0 for p in parts)


def test_flops_matching_uses_the_telemetry_formula(tmp_path):
    fl = 5e10
    sw = expand(tiny_spec(tmp_path, matching="flops", budgets=[fl]))
    sizes = {}
    for r in sw.runs:
        fpt = flops_per_token(r.config)
        assert r.tokens == int(fl // fpt)
        assert abs(r.flops() - fl) <= fpt
        sizes[r.size] = r.tokens
    assert sizes["xs"] > sizes["s"]      # the smaller model gets more tokens at one compute budget


def test_size_ladder_and_axes(tmp_path):
    spec = tiny_spec(tmp_path, sizes=[{"ladder": {"params": [3.5e4, 9e4, 2.2e5, 6e5], "aspect": 16}}],
                     recipes=["interleaving"], p=[0.25, 0.5], seeds=[1, 2], grid={"optimizer.lr": [1e-3, 3e-3]},
                     throughput={"tokens_per_s": 20000, "reference": "tiny"})
    sw = expand(spec)
    sizes = sorted({(r.config.num_parameters(), r.size) for r in sw.runs})
    assert len(sizes) >= 4
    for (n, _), target in zip(sizes, [3.5e4, 9e4, 2.2e5, 6e5]):
        assert target / 2 <= n <= target * 2
    assert len(sw.runs) == 4 * 2 * 2 * 2
    assert {r.config.optimizer.lr for r in sw.runs} == {1e-3, 3e-3}
    assert {r.p for r in sw.runs} == {0.25, 0.5}
    assert {k for k in sw.datasets if k.startswith("interleaved")} == {"interleaved@p0.25", "interleaved@p0.5"}
    assert {(r.seed, r.config.data.seed) for r in sw.runs} == {(1, 1), (2, 2)}
    # a preset and a recipe given as a run config path
    sw2 = expand(tiny_spec(tmp_path, sizes=["tiny"], recipes=[os.path.join(ROOT, "configs", "recipes", "qwen2-360m",
                                                                         "interleaving_ft.yaml")],
                           budgets=[100_000], throughput={"tokens_per_s": 20000, "reference": "tiny"}))
    r = sw2.runs[0]
    assert [s.name for s in r.config.schedule.stages][:2] == ["en_only", "interleaving"]
    assert sum(r.stage_tokens) == 100_000
    assert r.config.model.num_layers == 4


def test_plan_prints_the_table(tmp_path):
    r = sweep("plan", "--spec", tiny_spec(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for col in ("params", "tokens per stage", "steps", "FLOPs", "device-h"):
        assert col in out
    assert out.count(f".b{BUDGET}") == 4
    assert "20,000 tokens/s on 2 CPU cores" in out
    sw = expand(tiny_spec(tmp_path))
    assert format_plan(sw) in out


def test_plan_says_which_runs_fit_the_gpu(tmp_path):
    """The memory column: megaslm/memory.py's worst rank per run, against the GPU the spec names (its
    nominal memory, or throughput.gpu_memory_gib)."""
    from megaslm.memory import GIB, plan

    h100 = {"tokens_per_s": 20000, "reference": "xs", "device": "one H100 (assumed, bf16)"}
    sw = expand(tiny_spec(tmp_path, throughput=h100))
    rows = plan_rows(sw)
    for r, run in zip(rows, sw.runs):
        assert r["memory_gib"] == plan(run.config, sw.spec.world_size).worst.total / GIB
        assert r["fits"] is True
    text = format_plan(sw)
    assert "memory GiB" in text and "fits 80 GiB" in text and "against 80 GiB per GPU" in text
    # a size written into the spec wins over the device's; here 1.6 GiB: the small size fits, the bigger not
    xs, s = (plan(next(r for r in sw.runs if r.size == k).config, 1).worst.total / GIB for k in ("xs", "s"))
    assert xs < s
    limit = (xs + s) / 2
    r = sweep("plan", "--spec", tiny_spec(tmp_path, throughput=dict(h100, gpu_memory_gib=limit)))
    assert r.returncode == 0, r.stderr
    verdicts = {l.split()[0].split(".")[0]: l.split()[-1] for l in r.stdout.splitlines() if l.startswith(("xs.", "s."))}
    assert verdicts == {"xs": "yes", "s": "NO"}, r.stdout
    assert "2 runs do not fit" in r.stdout
    # a CPU device: estimated as on CPU, no verdict
    cpu = format_plan(expand(tiny_spec(tmp_path)))
    assert "as on CPU (no GPU named in throughput.device: no verdict)" in cpu


def test_overrides_after_options(tmp_path):
    # spec overrides may come anywhere after the command, options included (argparse intermixed)
    r = sweep("plan", "--spec", tiny_spec(tmp_path), "seeds=[1,2]")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(f".b{BUDGET}") == 8

def test_overrides_without_a_command_mean_run(monkeypatch):
    """`sweep.py budgets=[...]` runs, as `sweep.py` alone does (the README's demo line with smaller sizes)."""
    import importlib.util

    monkeypatch.syspath_prepend(os.path.join(ROOT, "launchers"))    # as for a script: its folder first

    spec = importlib.util.spec_from_file_location("sweep_launcher", os.path.join(ROOT, "launchers", "sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.with_command(["budgets=[1]", "seeds=[1]"]) == ["run", "budgets=[1]", "seeds=[1]"]
    assert mod.with_command(["--spec", "a=b.yaml", "seeds=[1]"]) == ["--spec", "a=b.yaml", "run", "seeds=[1]"]
    assert mod.with_command(["plan", "seeds=[1]"]) == ["plan", "seeds=[1]"]
    assert mod.with_command([]) == [] and mod.with_command(["--max-runs", "1"]) == ["--max-runs", "1"]
    a = mod._parser().parse_intermixed_args(mod.with_command(["--out", "x", "seeds=[1]"]))
    assert a.command == "run" and a.overrides == ["seeds=[1]"] and a.out == "x"


def test_valid_reaches_every_run(tmp_path):
    sw = expand(tiny_spec(tmp_path))
    for r in sw.runs:
        e = r.config.eval
        assert e.valid == [os.path.join(sw.data_dir, "valid")] and e.valid_interval == 5 and e.valid_sequences == 4
        assert "valid" in r.datasets   # built before the run, like its training data


def test_spec_error_is_a_sweep_error(tmp_path):
    with pytest.raises(SweepError, match="budgets"):
        expand(tiny_spec(tmp_path, budgets=[0]))


def test_sweep_library_is_torch_free_and_imports_no_tools():
    """The package sits above megaslm: from evals it takes only the torch-free task names and matrices of the
    report."""
    import subprocess
    import sys

    code = ("import sys, megaslm.sweeps.spec, megaslm.sweeps.expand, megaslm.sweeps.state, megaslm.sweeps.plan, "
            "megaslm.sweeps.execute, megaslm.sweeps.report\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'data_tools', 'launchers', 'deepspeed', "
            "'megatron') or (m.startswith('evals.') and m not in ('evals.benchmarks', 'evals.errors', 'evals.xling'))]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr


def test_a_key_given_twice_is_an_error(tmp_path):
    """The spec loader is the run config's strict one: a repeated key (here `seeds`, whose second value
    would silently win) is one line naming the file, the line and the key."""
    path = tiny_spec(tmp_path)
    with open(path, "a") as f:
        f.write("seeds: [1, 2]\n")
    with pytest.raises(SweepError) as e:
        expand(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(path + ":") and "duplicate key 'seeds'" in msg, msg
    r = sweep("plan", "--spec", path)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {msg}", r.stderr


def test_build_lists_know_the_data_tools_subcommands():
    """A dataset's build list is data_tools arguments when it starts with one of data_tools' subcommands,
    otherwise a command of its own: the list the sweep knows is data_tools' own."""
    from data_tools.cli import make_parser
    from megaslm.sweeps.spec import DATA_TOOLS_COMMANDS

    sub = next(a for a in make_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert sorted(DATA_TOOLS_COMMANDS) == sorted(sub.choices)


def test_build_forms(tmp_path):
    """data_tools arguments, a command (argv) and a shell string, each with the placeholders resolved."""
    import shlex
    import sys

    spec = tiny_spec(tmp_path, benchmarks=["b1", "b2"], datasets={
        **yaml.safe_load(open(tiny_spec(tmp_path)))["datasets"],
        "b1": {"kind": "files", "prefix": "{data}/b1", "build": ["{python}", "convert.py", "{data}/b1", "--p", "{p}"]},
        "b2": {"kind": "files", "prefix": "{data}/b 2", "build": "{python} convert.py {data}/'b 2' | tee log"}})
    sw = expand(spec)
    d = sw.datasets
    assert d["en"].command[:3] == [sys.executable, "-m", "data_tools"] and d["en"].command[3] == "build"
    b1 = d["b1@p0.5"]   # it uses {p}: one instance per value
    assert b1.command == [sys.executable, "convert.py", os.path.join(sw.data_dir, "b1"), "--p", "0.5"]
    assert b1.cwd == str(tmp_path)      # a command of its own runs in the spec's folder
    assert d["b2"].command == ["/bin/sh", "-c", f"{shlex.quote(sys.executable)} convert.py "
                                                f"{shlex.quote(sw.data_dir)}/'b 2' | tee log"]


def test_presets_include_the_3b_and_8b_shapes(tmp_path):
    from megaslm.sweeps.spec import PRESETS

    for name, path in PRESETS.items():
        assert os.path.isfile(os.path.join(ROOT, path)), name
    assert {os.path.basename(p)[:-5] for p in PRESETS.values()} == {
        f[:-5] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml")}
    sw = expand(tiny_spec(tmp_path, sizes=["llama3.2-3b", "llama3.1-8b"], recipes=["en_fr"], budgets=[10**8],
                          throughput={"tokens_per_s": 3000, "reference": "llama3.2-3b", "device": "one H100"}))
    params = {r.size: r.config.num_parameters() for r in sw.runs}
    # the presets' model sections over the spec's base (its unit vocabulary): 2.8B and 7.0B parameters
    assert 2.5e9 < params["llama3.2-3b"] < 3.2e9 and 6.5e9 < params["llama3.1-8b"] < 7.5e9, params


def test_without_the_repository_one_line_says_what_is_missing(tmp_path):
    """A non-editable `pip install .` ships the packages, not configs/ or launchers/: a sweep that needs
    them (a preset size, the trainer) says so in one line, naming where it looked; a spec that needs
    nothing from the repository still expands and plans."""
    import shutil
    import subprocess
    import sys

    site = tmp_path / "site-packages"
    for pkg in ("megaslm", "evals"):      # what the wheel holds (setup.py's packages) that a sweep imports
        shutil.copytree(os.path.join(ROOT, pkg), site / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    spec = tiny_spec(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys\n"
            "from megaslm.sweeps.expand import expand\n"
            "from megaslm.sweeps.execute import train_command\n"
            "from megaslm.sweeps.plan import format_plan\n"
            "from megaslm.sweeps.spec import SweepError\n"
            "assert __import__('megaslm').__file__.startswith(sys.argv[2]), 'not the installed copy'\n"
            "print(format_plan(expand(sys.argv[1])).splitlines()[0])\n"
            "for f in (lambda: expand(sys.argv[1], ['sizes=[tiny]', 'throughput.reference=tiny', 'budgets=[100000]']), lambda: train_command('c.yaml', 'py', 0, 1, None)):\n"
            "    try:\n"
            "        f()\n"
            "    except SweepError as e:\n"
            "        print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MEGASLM_ROOT", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-c", code, spec, str(site)], capture_output=True, text=True,
                       cwd=str(elsewhere), env=dict(env, PYTHONPATH=str(site)))
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0].startswith("run ") and "params" in out[0], out
    errs = [l for l in out if l.startswith("ERR ")]
    assert len(errs) == 2 and errs[0] == errs[1], out
    for e in errs:
        assert "configs, launchers/pretrain.py, launchers/eval.py" in e and "non-editable" in e, e
        assert f"looked in {site} (no configs, launchers/pretrain.py, launchers/eval.py)" in e, e
        assert str(elsewhere) in e and "MEGASLM_ROOT" in e, e
    # pointed at a checkout, the same installed copy finds it
    r = subprocess.run([sys.executable, "-c", code, spec, str(site)], capture_output=True, text=True,
                       cwd=str(elsewhere), env=dict(env, PYTHONPATH=str(site), MEGASLM_ROOT=ROOT))
    assert r.returncode == 0 and "ERR" not in r.stdout, r.stdout + r.stderr
