"""Token-budget-matched sweeps:  python launchers/sweep.py {plan,run,status,report} [--spec SPEC] [a.b.c=value ...]

With no arguments: `run` on configs/sweeps/demo.yaml (the CPU demo: EN+FR whole-story baseline vs
interleaving at a matched budget, 2 seeds) and then the report. Spec format: docs/sweeps.md.
  plan    the runs: parameters, tokens per stage, steps, FLOPs, estimated device-hours
  run     build missing data (once), train every run not finished (resuming interrupted ones), evaluate, report
  status  pending / partial / trained / evaluated per run (from checkpoint meta.json and eval results)
  report  results.csv, results.md (one row per arm, mean ± spread over seeds) and plots/*.png
Exit codes: 0 done, 1 a run failed (the others went on), 2 bad spec (one line naming the field).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, fail  # noqa: E402

DEFAULT_SPEC = os.path.join(ROOT, "configs", "sweeps", "demo.yaml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launchers/sweep.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[3:]))
    p.add_argument("command", nargs="?", default=None, choices=["plan", "run", "status", "report"])
    p.add_argument("--spec", default=DEFAULT_SPEC, help="sweep spec YAML (default configs/sweeps/demo.yaml)")
    p.add_argument("--out", default=None, help="sweep directory (default: the spec's output_dir)")
    p.add_argument("--max-runs", type=int, default=None,
                   help="run: start at most this many unfinished runs, then stop (the rest on the next call)")
    p.add_argument("overrides", nargs="*", metavar="a.b.c=value", help="overrides of the sweep spec's keys")
    return p


def _executor_runs(sw, todo, log):
    """Run ``todo`` (Run objects) with the spec's executor; returns {name: error or None}."""
    from megaslm.sweep import execute_run

    ex = sw.spec.executor
    sj = os.path.join(sw.dir, "sweep.json")
    python = ex.python or sys.executable
    results = {}
    if ex.kind == "local":
        if ex.parallel <= 1:
            for r in todo:
                log(f"[{time.strftime('%H:%M:%S')}] {r.name}: training + evaluation")
                results[r.name] = _guard(execute_run, sj, r.name, python, ex.gpus_per_run, 1, _devices(0, ex))
                log(f"[{time.strftime('%H:%M:%S')}] {r.name}: {results[r.name] or 'done'}")
            return results
        # N runs at once over the GPUs of this node: slot k owns devices [k*g, (k+1)*g)
        import queue
        import threading

        slots: "queue.Queue[int]" = queue.Queue()
        for k in range(ex.parallel):
            slots.put(k)
        threads = []

        def work(r):
            k = slots.get()
            try:
                log(f"[{time.strftime('%H:%M:%S')}] {r.name}: started (slot {k}, devices {_devices(k, ex)})")
                results[r.name] = _guard(execute_run, sj, r.name, python, ex.gpus_per_run, 1, _devices(k, ex))
                log(f"[{time.strftime('%H:%M:%S')}] {r.name}: {results[r.name] or 'done'}")
            finally:
                slots.put(k)

        for r in todo:
            while sum(t.is_alive() for t in threads) >= ex.parallel:
                time.sleep(0.2)
            t = threading.Thread(target=work, args=(r,), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        return results
    # SLURM (or submitit's LocalExecutor, the same code path without a cluster) through submitit
    import submitit

    folder = os.path.join(sw.dir, "submitit", "%j")
    if ex.kind == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder, python=python)
        executor.update_parameters(timeout_min=ex.time_min)
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_python=python)
        params = dict(timeout_min=ex.time_min, nodes=ex.nodes, tasks_per_node=1, cpus_per_task=ex.cpus_per_task,
                      name=f"sweep-{sw.spec.name}")
        if ex.gpus_per_node:
            params["gpus_per_node"] = ex.gpus_per_node
        if ex.partition:
            params["slurm_partition"] = ex.partition
        if ex.mem_gb:
            params["mem_gb"] = ex.mem_gb
        if ex.array:
            params["slurm_array_parallelism"] = ex.array_parallelism
        executor.update_parameters(**params)
    gpus = ex.gpus_per_node if ex.kind == "slurm" else ex.gpus_per_run
    if ex.kind == "slurm" and ex.array:
        n = len(todo)
        jobs = executor.map_array(execute_run, [sj] * n, [r.name for r in todo], [python] * n, [gpus] * n,
                                  [ex.nodes] * n)
    elif ex.kind == "submitit-local":
        # LocalExecutor starts every submitted job at once: submit executor.parallel at a time
        jobs = []
        for i, r in enumerate(todo):
            if i >= ex.parallel:
                jobs[i - ex.parallel].wait()
            jobs.append(executor.submit(execute_run, sj, r.name, python, gpus, 1))
            log(f"[{time.strftime('%H:%M:%S')}] {r.name}: submitted as job {jobs[-1].job_id}")
    else:
        jobs = [executor.submit(execute_run, sj, r.name, python, gpus, ex.nodes) for r in todo]
    if ex.kind != "submitit-local":
        for r, j in zip(todo, jobs):
            log(f"[{time.strftime('%H:%M:%S')}] {r.name}: submitted as job {j.job_id}")
    for r, j in zip(todo, jobs):
        try:
            j.results()   # every task's (a job of several nodes has one task per node; result() refuses it)
            results[r.name] = None
        except Exception as e:  # noqa: BLE001 - a failed job is reported, the others are collected
            msg = str(e).strip().splitlines()
            results[r.name] = next((l for l in reversed(msg) if "SweepError" in l or "error" in l.lower()),
                                   msg[-1] if msg else repr(e))
        log(f"[{time.strftime('%H:%M:%S')}] {r.name}: job {j.job_id} {results[r.name] or 'done'}")
    return results


def _devices(slot: int, ex):
    if ex.gpus_per_run <= 0:
        return None
    return ",".join(str(slot * ex.gpus_per_run + i) for i in range(ex.gpus_per_run))


def _guard(fn, *args):
    from megaslm.config import ConfigError

    try:
        fn(*args)
        return None
    except ConfigError as e:
        return str(e)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = _parser().parse_intermixed_args(argv)
    cmd = a.command or "run"
    from megaslm.config import ConfigError
    from megaslm.sweep import (ensure_dataset, expand, format_plan, format_status, refresh_token_weights,
                               run_state, write_configs)

    try:
        sw = expand(a.spec, a.overrides, a.out)
    except ConfigError as e:
        fail(str(e))
    if cmd == "plan":
        print(format_plan(sw))
        return 0
    if cmd == "status":
        print(format_status(sw))
        return 0
    if cmd == "report":
        return _report(sw)
    # run
    t0 = time.time()
    print(format_plan(sw), flush=True)
    try:
        write_configs(sw)
        states = {r.name: run_state(r) for r in sw.runs}
        todo = [r for r in sw.runs if states[r.name]["state"] != "evaluated"]
        done = [r.name for r in sw.runs if states[r.name]["state"] == "evaluated"]
        if done:
            print(f"already finished and evaluated (skipped): {', '.join(done)}", flush=True)
        if a.max_runs is not None:
            todo = todo[:a.max_runs]
        # data first, once, in this process: the jobs find it built (each job re-checks, under a lock)
        needed = list(dict.fromkeys(k for r in todo for k in r.datasets))
        for k in needed:
            ensure_dataset(sw.datasets, k, sw.data_dir, sw.spec.executor.python or sys.executable,
                           log=lambda m: print(m, flush=True))
        for r in sw.runs:
            if all(os.path.exists(sw.datasets[k].prefix) or os.path.exists(sw.datasets[k].prefix + ".bin")
                   for k in r.datasets):
                refresh_token_weights(r)
        write_configs(sw)
    except ConfigError as e:
        fail(str(e))
    results = _executor_runs(sw, todo, lambda m: print(m, flush=True)) if todo else {}
    failed = {k: v for k, v in results.items() if v}
    rc = _report(sw)
    print(f"sweep {sw.spec.name}: {len(todo)} run(s) processed in {time.time() - t0:.0f} s"
          + (f"; FAILED: {', '.join(f'{k} ({v})' for k, v in failed.items())}" if failed else ""), flush=True)
    return 1 if failed else rc


def _report(sw) -> int:
    from megaslm.sweep_report import write_report

    if not os.path.exists(os.path.join(sw.dir, "sweep.json")):
        fail(f"{sw.dir}: no sweep.json (run `launchers/sweep.py run` first)")
    rep = write_report(sw.dir)
    print(rep["table"])
    print("\n".join(f"power law {f}" for f in rep["fits"]))
    print(f"wrote {rep['csv']}, {rep['markdown']}, " + ", ".join(rep["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
