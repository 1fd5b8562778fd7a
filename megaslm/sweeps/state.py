"""The sweep's files and each run's state, read from what the processes wrote.

``<sweep>/configs/<run>.yaml`` is a run's resolved config (what its job trains; loadable by
``launchers/pretrain.py --config``); ``<sweep>/sweep.json`` the expansion: every run with its datasets,
every dataset instance with its build command, the benchmarks and what the jobs add to the environment.
A job reads these two files back (``load_job``): it never expands the spec again.

A run is pending (nothing saved), running (its lock held by a live process: the step it logged last),
stopped (interrupted: the step of its newest checkpoint), trained (the newest checkpoint holds its whole
budget, every stage's share) or evaluated (``evals/results.json`` newer than that checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import megaslm.fsutil as fsutil
from megaslm.checkpoint.layout import newest_meta  # the newest complete checkpoint's meta.json (+ its _path)
from megaslm.checkpoint.lock import holder, probe
from megaslm.config import ConfigError
from megaslm.config_io import load_config
from megaslm.sweeps.expand import Dataset, Run, Sweep
from megaslm.sweeps.spec import SweepError

STATES = ("pending", "running", "stopped", "trained", "evaluated")
LOCK = ".sweep.lock"   # in a run's directory: held (flock) by the process running it and handed to its children


def atomic_write(path: str, text: str) -> None:
    """``text`` written whole to ``path`` (megaslm.fsutil's rule), its folder made first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fsutil.atomic_write_text(path, text)


def run_config_path(sweep_dir: str, name: str) -> str:
    return os.path.join(sweep_dir, "configs", f"{name}.yaml")


def write_configs(sw: Sweep) -> List[str]:
    """One resolved run config per run, ``<sweep>/configs/<run>.yaml``, plus ``sweep.json`` (the expansion)."""
    paths = []
    for r in sw.runs:
        p = run_config_path(sw.dir, r.name)
        new = r.config.to_yaml()
        old = open(p).read() if os.path.exists(p) else None
        if old != new:
            atomic_write(p, new)
        paths.append(p)
    atomic_write(os.path.join(sw.dir, "sweep.json"), json.dumps(sweep_record(sw), indent=1))
    return paths


def sweep_record(sw: Sweep) -> Dict:
    return {
        "spec": sw.path, "overrides": sw.overrides, "dir": sw.dir, "data_dir": sw.data_dir,
        "matching": sw.spec.matching, "benchmarks": sw.benchmarks, "python": sw.python,
        "executor_env": list(sw.spec.executor.env), "eval_overrides": list(sw.spec.eval_overrides),
        "datasets": {k: dataclasses.asdict(d) for k, d in sw.datasets.items()},
        "runs": [{"name": r.name, "size": r.size, "recipe": r.recipe, "arm": r.arm, "budget": r.budget, "p": r.p,
                  "seed": r.seed, "grid": r.grid, "params": r.config.num_parameters(), "tokens": r.tokens,
                  "stage_tokens": r.stage_tokens, "flops": r.flops(), "dir": r.dir,
                  "config": run_config_path(sw.dir, r.name), "datasets": r.datasets,
                  "tokens_weighted": r.tokens_weighted}
                 for r in sw.runs]}


@dataclass
class Job:
    """What one run's job needs, read back from ``sweep.json`` and the run's resolved config."""
    run: Run
    config_path: str
    datasets: Dict[str, Dataset]
    data_dir: str
    benchmarks: List[str]
    env: List[str]                 # KEY=VALUE (executor.env)
    eval_overrides: List[str]


def load_job(sweep_json: str, name: str) -> Job:
    try:
        with open(sweep_json) as f:
            sj = json.load(f)
    except (OSError, ValueError) as e:
        raise SweepError(f"{sweep_json}: cannot read the sweep's expansion ({e}); run the sweep again") from None
    rec = next((r for r in sj["runs"] if r["name"] == name), None)
    if rec is None:
        raise SweepError(f"run {name}: not in {sweep_json} any more (the spec changed); run the sweep again")
    try:
        cfg = load_config(rec["config"])
    except ConfigError as e:
        raise SweepError(f"run {name}: {e}") from None
    run = Run(name, rec["size"], rec["recipe"], rec["budget"], rec["p"], rec["seed"], rec["grid"], cfg,
              rec["stage_tokens"], rec["datasets"], rec["tokens_weighted"])
    datasets = {k: Dataset(**d) for k, d in sj["datasets"].items()}
    return Job(run, rec["config"], datasets, sj["data_dir"], sj["benchmarks"], sj["executor_env"], sj["eval_overrides"])


# ------------------------------------------------------------------------------------------------
# Run state
# ------------------------------------------------------------------------------------------------
def lock_held(run_dir: str) -> bool:
    """Whether a live process holds the run's sweep lock or its trainer's output_dir lock (a killed
    holder's lock goes with it): a trainer started by hand in the run directory counts too."""
    return probe(os.path.join(run_dir, LOCK)) is not None or holder(run_dir) is not None


def last_logged(run_dir: str) -> Optional[Tuple[int, int]]:
    """(step, tokens_seen) of the last training record in ``metrics.jsonl`` (its tail only)."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue    # a torn line (a kill mid-write) or the first, cut by the seek
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and "tokens_seen" in rec:
            return rec["step"], rec["tokens_seen"]
    return None


def run_state(run: Run, live: bool = True) -> Dict:
    """``{state: pending|running|stopped|trained|evaluated, step, tokens_seen, checkpoint, ...}``.
    ``live``: tell a run whose lock a live process holds (``running``, at the step it logged last) from
    one nobody runs; the process that holds the lock itself asks with ``live=False``."""
    meta = newest_meta(run.dir)
    st = {"run": run.name, "state": "pending", "step": 0, "tokens_seen": 0, "checkpoint": None,
          "budget": run.tokens, "steps": run.config.total_steps()}
    if meta is not None:
        st.update(step=meta.get("step", 0), tokens_seen=meta.get("tokens_seen", 0), checkpoint=meta["_path"])
        budgets = {s.name: s.train_tokens for s in run.config.schedule.stages}
        done = meta.get("tokens_seen") == run.tokens and all(
            meta.get("stage_tokens", {}).get(k) == v for k, v in budgets.items())
        st["state"] = "trained" if done else "stopped"
        res = os.path.join(run.dir, "evals", "results.json")
        if done and os.path.exists(res) and os.path.getmtime(res) >= os.path.getmtime(
                os.path.join(meta["_path"], "meta.json")):
            st["state"] = "evaluated"
    if live and st["state"] != "evaluated" and lock_held(run.dir):
        st["state"] = "running"
        logged = last_logged(run.dir)
        if logged and logged[0] > st["step"]:
            st["step"], st["tokens_seen"] = logged
    return st


def format_status(runs: Sequence[Run]) -> str:
    rows = [run_state(r) for r in runs]
    w = max(len(r["run"]) for r in rows)
    lines = [f"{'run'.ljust(w)}  {'state':9s}  {'step':>12s}  tokens"]
    for r in rows:
        lines.append(f"{r['run'].ljust(w)}  {r['state']:9s}  {r['step']:>5,}/{r['steps']:<6,}  "
                     f"{r['tokens_seen']:,}/{r['budget']:,}")
    counts = {k: sum(r["state"] == k for r in rows) for k in STATES}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    if counts["running"] or counts["stopped"]:
        summary += (" (running: its lock held by a live process, at the step it logged last; stopped: "
                    "interrupted, at its newest checkpoint's step; `run` resumes it)")
    lines.append(summary)
    return "\n".join(lines)
