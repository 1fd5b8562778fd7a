"""Token-budget-matched sweeps:  python launchers/sweep.py {plan,run,status,report,data} [--spec SPEC] [a.b.c=value ...]

With no arguments: `run` on configs/sweeps/demo.yaml (the CPU demo: EN+FR whole-story baseline vs
interleaving at a matched budget, 2 seeds) and then the report. Spec format: docs/sweeps.md.
  plan    the runs: parameters, tokens per stage, steps, FLOPs, estimated device-hours, memory per GPU
  run     build missing data (once), train every run not finished (resuming interrupted ones), evaluate, report
  status  pending / running / stopped / trained / evaluated per run (running: its lock held by a live process)
  report  results.csv, results.md (one row per arm, mean ± spread over seeds) and plots/*.png
  data    build the spec's datasets (every one at every p, or those named by --dataset) and stop: no training
Exit codes: 0 done, 1 a run (or a data build) failed (the other runs went on), 2 bad spec (one line naming the field).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from _common import ROOT, ArgumentParser, fail  # noqa: E402

from megaslm.progress import add_progress_option, apply_progress_option  # noqa: E402

DEFAULT_SPEC = os.path.join(ROOT, "configs", "sweeps", "demo.yaml")
# the sweep runs this checkout's launchers and presets, whichever megaslm was imported (a non-editable install)
os.environ.setdefault("MEGASLM_ROOT", ROOT)


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="launchers/sweep.py", description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("command", nargs="?", default=None, choices=["plan", "run", "status", "report", "data"])
    p.add_argument("--spec", default=DEFAULT_SPEC, help="sweep spec YAML (default configs/sweeps/demo.yaml)")
    p.add_argument("--out", default=None, help="sweep directory (default: the spec's output_dir)")
    p.add_argument("--max-runs", type=int, default=None,
                   help="run: start at most this many unfinished runs, then stop (the rest on the next call)")
    p.add_argument("--dataset", action="append", default=None, metavar="NAME",
                   help="data: build this dataset (and what it needs) only; repeatable")
    add_progress_option(p)    # the sweep's own runs-done lines, and its data builds' and evaluations' (their logs)
    p.add_argument("overrides", nargs="*", metavar="a.b.c=value", help="overrides of the sweep spec's keys")
    return p


def with_command(argv):
    """``sweep.py a.b=c ...`` is ``sweep.py run a.b=c ...``: the command may be left out before overrides as well as
    alone (argparse would take the first override for an invalid command)."""
    takes_value = {o for a in _parser()._actions if a.option_strings and a.nargs != 0 for o in a.option_strings}
    i = 0
    while i < len(argv):
        if argv[i] in takes_value:
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return argv[:i] + ["run"] + argv[i:] if "=" in argv[i] else argv
    return argv


def main(argv=None) -> int:
    a = _parser().parse_intermixed_args(with_command(list(sys.argv[1:] if argv is None else argv)))
    apply_progress_option(a.progress_every)
    cmd = a.command or "run"
    from megaslm.config import ConfigError
    from megaslm.sweeps.expand import expand
    from megaslm.sweeps.plan import format_plan
    from megaslm.sweeps.state import format_status

    try:
        sw = expand(a.spec, a.overrides, a.out)
        if cmd == "plan":
            print(format_plan(sw))
        elif cmd == "status":
            print(format_status(sw.runs))
    except ConfigError as e:
        fail(str(e))
    if cmd in ("plan", "status"):
        return 0
    if cmd == "report":
        return _report(sw)
    if cmd == "data":
        return _data(sw, a.dataset)
    return _run(sw, a.max_runs)


def _data(sw, names) -> int:
    from megaslm.config import ConfigError
    from megaslm.sweeps.execute import build_data

    try:
        lines = build_data(sw, names, log=lambda m: print(m, flush=True))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def _run(sw, max_runs) -> int:
    from megaslm.config import ConfigError
    from megaslm.sweeps.execute import prepare, run_all
    from megaslm.sweeps.plan import format_plan
    from megaslm.sweeps.state import run_state

    t0 = time.time()
    log = lambda m: print(m, flush=True)  # noqa: E731
    try:
        log(format_plan(sw))
        states = {r.name: run_state(r) for r in sw.runs}
        todo = [r for r in sw.runs if states[r.name]["state"] != "evaluated"]
        done = [r.name for r in sw.runs if states[r.name]["state"] == "evaluated"]
        if done:
            log(f"already finished and evaluated (skipped): {', '.join(done)}")
        if max_runs is not None:
            todo = todo[:max_runs]
        # data first, once, in this process: the jobs find it built (each job re-checks, under a lock)
        prepare(sw, todo, log)
    except ConfigError as e:
        fail(str(e))
    results = run_all(sw, todo, log) if todo else {}
    failed = {k: v for k, v in results.items() if v}
    rc = _report(sw)
    log(f"sweep {sw.spec.name}: {len(todo)} run(s) processed in {time.time() - t0:.0f} s"
        + (f"; FAILED: {', '.join(f'{k} ({v})' for k, v in failed.items())}" if failed else ""))
    return 1 if failed else rc


def _report(sw) -> int:
    from megaslm.sweeps.report import write_report

    if not os.path.exists(os.path.join(sw.dir, "sweep.json")):
        fail(f"{sw.dir}: no sweep.json (run `launchers/sweep.py run` first)")
    rep = write_report(sw.dir)
    print(rep["table"])
    print("\n".join(f"power law {f}" for f in rep["fits"]))
    print(f"wrote {rep['csv']}, {rep['markdown']}, " + ", ".join(rep["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
