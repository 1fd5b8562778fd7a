"""One record format and one results folder for every benchmark of the project (the shared harness).

Every benchmark script -- the kernel benchmarks and the compile check beside this file, ``data_tools/bench_build.py``,
``data_tools/audio/throughput.py``, ``launchers/bench_train.py``, ``launchers/bench_trainer_cpu.py`` -- stays beside
the code it measures and stores what it measured through this module, as one JSON record per run:

    {"format": "megaslm-bench/1",
     "benchmark": "bench_build",                       # the script's short name (the file name's first part)
     "device": "cpu: AMD EPYC, 2 cores",               # or the GPU's name (torch.cuda.get_device_name)
     "commit": "<git sha>[-dirty]", "date": "2026-12-02T07:29:06Z",          # UTC, when the run started
     "load": {"before": [1.36, 1.66, 2.09], "after": [...]},                   # 1/5/15-minute load averages
     "command": "python -m data_tools.bench_build --repeats 5",
     "dry_run": false,                                 # true: plumbing check, the figures mean nothing
     "goals": [{"name": ..., "measured": ..., "op": ">=", "target": ..., "unit": ..., "met": true}],
     "met": true,                                      # every goal met / one not met / null: unknown or none
     "figures": {...},                                 # what the benchmark measured, in its own shape
     "environment": {"python": "3.11.7", ...}}         # versions and settings that explain the figures

A figure nobody measured is ``null``, never a guess. Records converted from the former result folders say where
they came from in ``converted_from``.

The results folder is ``docs/bench/`` (``RESULTS_DIR``): the results are documentation of the code at a
commit -- cited by the README's performance table, committed with device, commit and date -- not part of any
package (a wheel ships none of them), and one folder outside the packages is the only place every benchmark
may write to without a package owning another's files. File names: ``<benchmark>-<device slug>-<UTC
date>T<time>Z.json`` (:func:`default_stem`), so runs accumulate and sort by benchmark, device and time; a
benchmark may write companions beside its record under the same stem (``.csv`` rows, an ``.md`` table).
``kernels/choice.py`` reads the attention records here to pick the ``auto`` attention backend.

Why this module lives in ``kernels/bench/``: the import rules (ARCHITECTURE.md, tests/test_import_rules.py)
let ``kernels/`` import only the standard library, torch and triton, and ``kernels/bench/`` is part of
``kernels/``; every other package may import ``kernels``. So the one harness all benchmarks may import is a
module of ``kernels``, and it uses the standard library only, so that torch-free code (``data_tools``) can
import it without importing torch (``kernels/__init__`` imports nothing heavy; a test checks both).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import operator
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

FORMAT = "megaslm-bench/1"
REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "docs" / "bench"
FIELDS = ("format", "benchmark", "device", "commit", "date", "load", "command", "dry_run", "goals", "met",
          "figures", "environment")
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


# ----------------------------------------------------------------------------------------------
# what every record states about the run
# ----------------------------------------------------------------------------------------------
def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_average() -> Optional[List[float]]:
    """The machine's 1/5/15-minute load averages (a busy machine makes every figure slower), or None."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> str:
    """``git rev-parse HEAD`` of this checkout, ``-dirty`` when a tracked file differs; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("-dirty" if sha and dirty else "")


def cpu_device() -> str:
    """``cpu: <model name>, <N> cores`` (the device of a CPU benchmark)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"cpu: {name}, {os.cpu_count()} cores"


def command_line(argv: Optional[Iterable[str]] = None, prog: Optional[str] = None) -> str:
    """The command that ran: ``prog`` (default: ``python -m <module>`` or ``python <script>`` as started)
    followed by ``argv`` (default: ``sys.argv[1:]``)."""
    if prog is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if spec is not None and spec.name not in (None, "__main__"):
            prog = f"python -m {spec.name}"
        else:
            script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "?"
            rel = os.path.relpath(script, REPO_ROOT)
            prog = "python " + (script if rel.startswith("..") else rel)
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join([prog] + [shlex.quote(str(a)) for a in args])


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-.") or "device"


# ----------------------------------------------------------------------------------------------
# goals
# ----------------------------------------------------------------------------------------------
def goal(name: str, measured, op: str, target, unit: Optional[str] = None) -> dict:
    """One goal and whether the measured figure meets it: ``met`` is None when nothing was measured."""
    if op not in OPS:
        raise ValueError(f"goal {name!r}: op must be one of {list(OPS)}, got {op!r}")
    if isinstance(measured, float) and not math.isfinite(measured):
        measured = None
    return {"name": name, "measured": measured, "op": op, "target": target, "unit": unit,
            "met": None if measured is None else bool(OPS[op](measured, target))}


def overall(goals: Iterable[dict]) -> Optional[bool]:
    """False when any goal is not met, else None when any is unknown (or there is none), else True."""
    mets = [g.get("met") for g in goals]
    if any(m is False for m in mets):
        return False
    if not mets or any(m is None for m in mets):
        return None
    return True


# ----------------------------------------------------------------------------------------------
# the record
# ----------------------------------------------------------------------------------------------
def _clean(x):
    """JSON without NaN/inf (a figure that could not be measured is null)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def make_record(benchmark: str, device: str, figures: dict, *, command: str, commit: str, date: str,
                load_before=None, load_after=None, goals: Iterable[dict] = (), dry_run: bool = False,
                environment: Optional[dict] = None, **extra) -> dict:
    goals = [dict(g) for g in goals]
    if dry_run:  # plumbing only: no goal is judged on a dry run's figures
        for g in goals:
            g["met"] = None
    rec = {"format": FORMAT, "benchmark": benchmark, "device": device, "commit": commit, "date": date,
           "load": {"before": load_before, "after": load_after}, "command": command, "dry_run": bool(dry_run),
           "goals": goals, "met": overall(goals), "figures": figures,
           "environment": {"python": platform.python_version(), **(environment or {})}, **extra}
    return validate(_clean(rec))


class Run:
    """A benchmark run: created when it starts (date, commit, load before, command), written when it ends."""

    def __init__(self, benchmark: str, argv: Optional[Iterable[str]] = None, prog: Optional[str] = None):
        self.benchmark = benchmark
        self.command = command_line(argv, prog)
        self.date = utc_now()
        self.commit = git_commit()
        self.load_before = load_average()

    def record(self, device: str, figures: dict, goals: Iterable[dict] = (), dry_run: bool = False,
               environment: Optional[dict] = None, **extra) -> dict:
        return make_record(self.benchmark, device, figures, command=self.command, commit=self.commit,
                           date=self.date, load_before=self.load_before, load_after=load_average(), goals=goals,
                           dry_run=dry_run, environment=environment, **extra)

    def write(self, device: str, figures: dict, goals: Iterable[dict] = (), *, out=None, stem: Optional[str] = None,
              companions: Optional[Dict[str, str]] = None, dry_run: bool = False,
              environment: Optional[dict] = None, **extra) -> Path:
        rec = self.record(device, figures, goals, dry_run, environment, **extra)
        return write_record(rec, out, stem, companions)


def validate(rec: dict) -> dict:
    """The record itself, or ValueError naming what is wrong with it."""
    if not isinstance(rec, dict):
        raise ValueError(f"a benchmark record is a JSON object, got {type(rec).__name__}")
    missing = [k for k in FIELDS if k not in rec]
    if missing:
        raise ValueError(f"benchmark record: missing {', '.join(missing)}")
    if rec["format"] != FORMAT:
        raise ValueError(f"benchmark record: format {rec['format']!r}, expected {FORMAT!r}")
    for key in ("benchmark", "device", "date", "command"):
        if not isinstance(rec[key], str) or not rec[key]:
            raise ValueError(f"benchmark record: {key} must be a non-empty string, got {rec[key]!r}")
    if not isinstance(rec["load"], dict) or set(rec["load"]) != {"before", "after"}:
        raise ValueError(f"benchmark record: load must be {{before, after}}, got {rec['load']!r}")
    if not isinstance(rec["figures"], dict) or not isinstance(rec["goals"], list):
        raise ValueError("benchmark record: figures must be an object and goals a list")
    for g in rec["goals"]:
        if not isinstance(g, dict) or not {"name", "measured", "op", "target", "met"} <= set(g):
            raise ValueError(f"benchmark record: a goal needs name, measured, op, target, met; got {g!r}")
    if rec["met"] != overall(rec["goals"]):
        raise ValueError(f"benchmark record: met {rec['met']!r} disagrees with its goals ({overall(rec['goals'])!r})")
    return rec


def default_stem(benchmark: str, device: str, date: str) -> str:
    """``<benchmark>-<device slug>-<date>T<HHMMSS>Z``: runs accumulate and sort by benchmark, device, time."""
    return f"{benchmark}-{slug(device)}-{date.replace(':', '')}"


def render(x, pad: str = "") -> str:
    """JSON, one value per line only where the value does not fit on one (rows stay one line each: diffs of a
    results folder read row by row)."""
    flat = json.dumps(x, allow_nan=False)
    if len(pad) + len(flat) <= 118 or not isinstance(x, (dict, list)) or not x:
        return flat
    inner = pad + " "
    if isinstance(x, list) and all(isinstance(v, dict) and not any(isinstance(w, (dict, list)) for w in v.values())
                                   for v in x):   # a table: one row per line, however long
        return "[\n" + ",\n".join(inner + json.dumps(v, allow_nan=False) for v in x) + "\n" + pad + "]"
    if isinstance(x, dict):
        body = [f"{inner}{json.dumps(str(k))}: {render(v, inner)}" for k, v in x.items()]
        return "{\n" + ",\n".join(body) + "\n" + pad + "}"
    return "[\n" + ",\n".join(inner + render(v, inner) for v in x) + "\n" + pad + "]"


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, synced, then renamed: a reader
    (or a run killed mid-write) sees the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_record(rec: dict, out=None, stem: Optional[str] = None,
                 companions: Optional[Dict[str, str]] = None) -> Path:
    """Store ``rec`` (and companions: ``{".csv": text, ".md": text}``) atomically. ``out``: the results folder
    (default :data:`RESULTS_DIR`), or a ``.json`` file path (its companions beside it, same stem)."""
    validate(rec)
    out = Path(out) if out is not None else RESULTS_DIR
    if out.suffix == ".json":
        folder, stem = out.parent, out.stem
    else:
        folder, stem = out, stem or default_stem(rec["benchmark"], rec["device"], rec["date"])
    folder.mkdir(parents=True, exist_ok=True)
    text = render(rec) + "\n"   # serialised before anything is written
    for ext, body in (companions or {}).items():
        atomic_write_text(folder / f"{stem}{ext}", body)
    path = folder / f"{stem}.json"
    atomic_write_text(path, text)
    return path


def read_records(folder=None, benchmarks: Optional[Iterable[str]] = None) -> Iterator[Tuple[Path, dict]]:
    """(path, record) for every valid record in ``folder`` (default :data:`RESULTS_DIR`), oldest first (by the
    record's date, then file name); unreadable files and other JSON are skipped."""
    folder = Path(folder) if folder is not None else RESULTS_DIR
    if not folder.is_dir():
        return
    wanted = set(benchmarks) if benchmarks is not None else None
    found = []
    for path in folder.glob("*.json"):
        try:
            rec = validate(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
        if wanted is None or rec["benchmark"] in wanted:
            found.append((rec["date"], path.name, path, rec))
    for _, _, path, rec in sorted(found, key=lambda t: t[:2]):
        yield path, rec
