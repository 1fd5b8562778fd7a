"""Running a sweep: data builds (once, under a lock, with a marker), one run's job (train, then evaluate:
the same function locally, in submitit's LocalExecutor and on SLURM) and the executors that start them.

Every step is a process: the dataset's build command (``python -m data_tools ...`` or the spec's own),
``launchers/pretrain.py`` (through ``deepspeed`` with several GPUs or nodes) and ``launchers/eval.py``.
A job reads the resolved run config and ``sweep.json`` the driver wrote (``state.load_job``).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megaslm.config import ConfigError
from megaslm.sweeps.expand import Dataset, Run, Sweep, refresh_token_weights
from megaslm.sweeps.spec import SweepError, repo_root
from megaslm.ports import free_port
from megaslm.progress import Progress
from megaslm.sweeps.state import LOCK, Job, atomic_write, load_job, run_state, write_configs

Log = Callable[[str], None]


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
    try:
        root = repo_root()   # the children import the checkout the sweep runs from
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    except SweepError:
        pass                 # a data build needs no checkout (data_tools is installed); training says what is missing
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def _call(cmd: List[str], log_path: str, env: Optional[Dict[str, str]] = None, what: str = "",
          pass_fds: Tuple[int, ...] = (), cwd: Optional[str] = None) -> None:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        log.flush()
        try:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or _env(),
                                 cwd=cwd or repo_root(), pass_fds=pass_fds)
        except OSError as e:   # the program itself is missing or not executable
            raise SweepError(f"{what or cmd[0]}: cannot start {cmd[0]!r} ({e.strerror})") from None
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


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def ensure_dataset(instances: Dict[str, Dataset], key: str, data_dir: str, log: Log = print) -> bool:
    """Build ``key`` (after its needs) once: an flock serialises concurrent runs, a ``.done`` marker
    written after a successful build (atomically) makes later calls no-ops. Returns whether it ran a build."""
    d = instances[key]
    built = False
    for n in d.needs:
        built |= ensure_dataset(instances, n, data_dir, log)
    safe = re.sub(r"[^A-Za-z0-9_.=-]", "_", key)
    marker = os.path.join(data_dir, ".built", f"{safe}.done")
    if os.path.exists(marker) or (not d.command and d.exists()):
        return built
    with file_lock(os.path.join(data_dir, ".built", f"{safe}.lock")):
        if os.path.exists(marker):
            return built
        if not d.command:
            if d.exists():   # made by one of its needs
                atomic_write(marker, json.dumps({"made_by": d.needs, "time": time.time()}))
                return built
            raise SweepError(f"datasets.{key}: {d.prefix} does not exist after building {d.needs} and has no build command")
        log(f"building dataset {key}: {shlex.join(d.command)}")
        t0 = time.time()
        _call(d.command, os.path.join(data_dir, "logs", f"{safe}.log"), what=f"data build {key}", cwd=d.cwd)
        if not d.exists():
            raise SweepError(f"datasets.{key}: the build finished but {d.prefix} does not exist (prefix wrong?)")
        atomic_write(marker, json.dumps({"build": d.command, "seconds": time.time() - t0, "time": time.time()}))
        return True


def build_data(sw: Sweep, names: Optional[Sequence[str]] = None, log: Log = print) -> List[str]:
    """``launchers/sweep.py data``: build datasets without training: ``names`` (each at every ``{p}``
    it uses, after its needs), default every dataset of the spec; returns one line per dataset."""
    keys = list(sw.datasets)
    if names:
        unknown = [n for n in names if n not in sw.spec.datasets]
        if unknown:
            raise SweepError(f"datasets: {unknown[0]!r} is not a dataset of this spec "
                             f"(defined: {', '.join(sw.spec.datasets) or 'none'})")
        keys = [k for k in keys if k.split("@")[0] in names]
    out = []
    for k in keys:
        ran = ensure_dataset(sw.datasets, k, sw.data_dir, log)
        d = sw.datasets[k]
        out.append(f"{k}: {d.prefix}{'' if d.kind == 'files' else '.bin/.idx'} "
                   f"({'built' if ran else 'already there'})")
    return out


# ------------------------------------------------------------------------------------------------
# One run's job
# ------------------------------------------------------------------------------------------------
def _job_environment():
    """submitit's view of the job this process runs in, or None outside one."""
    try:
        import submitit

        return submitit.JobEnvironment()
    except (ImportError, RuntimeError):
        return None


def hostfile_from_job(path: str, gpus_per_node: int) -> Optional[str]:
    """A DeepSpeed hostfile (``host slots=N``) from the SLURM allocation's hosts
    (``submitit.JobEnvironment().hostnames``); None outside a SLURM job."""
    env = _job_environment()
    if env is None or env.cluster != "slurm":
        return None
    atomic_write(path, "".join(f"{h} slots={max(gpus_per_node, 1)}\n" for h in env.hostnames))
    return path


def train_command(cfg_path: str, python: str, gpus: int, nodes: int, hostfile: Optional[str],
                  port: Optional[int] = None) -> List[str]:
    """The trainer's command line; runs of one node never share a rendezvous port (``port``)."""
    script = os.path.join(repo_root(), "launchers", "pretrain.py")
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
    if nodes > 1:
        env = _job_environment()
        if env is not None and env.global_rank > 0:
            # a job of several nodes runs this once per node (one task each); the first task starts deepspeed
            # on every node of the allocation over its hostfile, the others have nothing to do
            return {}
    job = load_job(sweep_json, name)
    run = job.run
    # One process per run at a time. The lock's descriptor is handed to the trainer and the evaluator
    # (pass_fds), so it stays held while they live even if this process is killed: a second sweep
    # started meanwhile refuses the run instead of training it twice into the same directory.
    os.makedirs(run.dir, exist_ok=True)
    lock = open(os.path.join(run.dir, LOCK), "a")
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
        raise SweepError(f"run {name}: another process is running it (lock {run.dir}/{LOCK}); "
                         "run the sweep again when it has finished") from None
    try:
        return _execute_locked(job, python or sys.executable, gpus, nodes, devices, (lock.fileno(),))
    finally:
        lock.close()


def _execute_locked(job: Job, python: str, gpus: int, nodes: int, devices: Optional[str],
                    fds: Tuple[int, ...]) -> Dict:
    run = job.run
    for k in run.datasets:
        ensure_dataset(job.datasets, k, job.data_dir, log=lambda m: None)
    if refresh_token_weights(run):   # a dataset built only now: its weight by tokens is known only now
        atomic_write(job.config_path, run.config.to_yaml())
    env = _env()
    for kv in job.env:
        k, _, v = kv.partition("=")
        env[k] = v
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    st = run_state(run, live=False)
    if st["state"] in ("pending", "stopped"):
        st = _train(job, python, gpus, nodes, env, fds)
    if st["state"] == "trained" and job.benchmarks:
        st = _evaluate(job, python, st["checkpoint"], env, fds)
    return st


def _train(job: Job, python: str, gpus: int, nodes: int, env: Dict[str, str], fds: Tuple[int, ...]) -> Dict:
    run, log = job.run, os.path.join(job.run.dir, "logs", "train.log")
    hf = hostfile_from_job(os.path.join(run.dir, "hostfile"), gpus) if nodes > 1 else None
    port = free_port()
    env["MASTER_PORT"] = str(port)   # a single process picks its rendezvous from here; deepspeed from --master_port
    _call(train_command(job.config_path, python, gpus, nodes, hf, port), log, env, f"training {run.name}", fds)
    st = run_state(run, live=False)
    if st["state"] not in ("trained", "evaluated"):
        raise SweepError(f"training {run.name} stopped at {st['tokens_seen']:,} of {run.tokens:,} tokens "
                         f"(pre-empted? re-run the sweep to resume); log {log}")
    return st


def _evaluate(job: Job, python: str, checkpoint: str, env: Dict[str, str], fds: Tuple[int, ...]) -> Dict:
    run = job.run
    out = os.path.join(run.dir, "evals")
    tmp = out + ".tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)
    env["MASTER_PORT"] = str(free_port())   # launchers/eval.py alone would take 29500: parallel runs collide
    _call([python, os.path.join(repo_root(), "launchers", "eval.py"), "--checkpoint", checkpoint,
           "--benchmarks", *job.benchmarks, "--out", tmp, *job.eval_overrides],
          os.path.join(run.dir, "logs", "eval.log"), env, f"evaluation {run.name}", fds)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return run_state(run, live=False)


# ------------------------------------------------------------------------------------------------
# Executors: every run's job, one after another, N at once, or through submitit (SLURM or local)
# ------------------------------------------------------------------------------------------------
def _stamp() -> str:
    return time.strftime("%H:%M:%S")


def _devices(slot: int, gpus_per_run: int) -> Optional[str]:
    if gpus_per_run <= 0:
        return None
    return ",".join(str(slot * gpus_per_run + i) for i in range(gpus_per_run))


def _guard(fn, *args) -> Optional[str]:
    try:
        fn(*args)
        return None
    except ConfigError as e:
        return str(e)


def run_all(sw: Sweep, todo: Sequence[Run], log: Log) -> Dict[str, Optional[str]]:
    """Run ``todo`` with the spec's executor; returns {run name: error line or None}."""
    # the runs done so far of ``todo``, their total and an ETA (megaslm.progress: a line on stderr per run
    # done once N seconds have passed, a bar on a TTY)
    with Progress(f"sweep {sw.spec.name}", total=len(todo), unit="runs") as bar:
        if sw.spec.executor.kind == "local":
            return _run_local(sw, todo, log, bar.update)
        return _run_submitit(sw, todo, log, bar.update)


def _run_local(sw: Sweep, todo: Sequence[Run], log: Log, done: Callable[[], None]) -> Dict[str, Optional[str]]:
    """``parallel`` runs at once over the GPUs of this node: slot k owns devices [k*g, (k+1)*g)."""
    import queue
    import threading

    ex, sj = sw.spec.executor, os.path.join(sw.dir, "sweep.json")
    results: Dict[str, Optional[str]] = {}
    slots: "queue.Queue[int]" = queue.Queue()
    for k in range(ex.parallel):
        slots.put(k)

    def work(r: Run) -> None:
        k = slots.get()
        try:
            devs = _devices(k, ex.gpus_per_run)
            log(f"[{_stamp()}] {r.name}: " + ("training + evaluation" if ex.parallel <= 1 else
                                              f"started (slot {k}, devices {devs})"))
            results[r.name] = _guard(execute_run, sj, r.name, sw.python, ex.gpus_per_run, 1, devs)
            log(f"[{_stamp()}] {r.name}: {results[r.name] or 'done'}")
            done()
        finally:
            slots.put(k)

    if ex.parallel <= 1:
        for r in todo:
            work(r)
        return results
    threads: List[threading.Thread] = []
    for r in todo:
        while sum(t.is_alive() for t in threads) >= ex.parallel:
            time.sleep(0.2)
        t = threading.Thread(target=work, args=(r,), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return results


def _submitit_executor(sw: Sweep):
    """SLURM (or submitit's LocalExecutor, the same code path without a cluster)."""
    import submitit

    ex = sw.spec.executor
    folder = os.path.join(sw.dir, "submitit", "%j")
    if ex.kind == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder, python=sw.python)
        executor.update_parameters(timeout_min=ex.time_min)
        return executor
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_python=sw.python)
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
    return executor


def _run_submitit(sw: Sweep, todo: Sequence[Run], log: Log, done: Callable[[], None]) -> Dict[str, Optional[str]]:
    ex, sj, py = sw.spec.executor, os.path.join(sw.dir, "sweep.json"), sw.python
    executor = _submitit_executor(sw)
    gpus = ex.gpus_per_node if ex.kind == "slurm" else ex.gpus_per_run
    n = len(todo)
    if ex.kind == "slurm" and ex.array:
        jobs = executor.map_array(execute_run, [sj] * n, [r.name for r in todo], [py] * n, [gpus] * n, [ex.nodes] * n)
    elif ex.kind == "submitit-local":
        # LocalExecutor starts every submitted job at once: submit executor.parallel at a time
        jobs = []
        for i, r in enumerate(todo):
            if i >= ex.parallel:
                jobs[i - ex.parallel].wait()
            jobs.append(executor.submit(execute_run, sj, r.name, py, gpus, 1))
            log(f"[{_stamp()}] {r.name}: submitted as job {jobs[-1].job_id}")
    else:
        jobs = [executor.submit(execute_run, sj, r.name, py, gpus, ex.nodes) for r in todo]
    if ex.kind != "submitit-local":
        for r, j in zip(todo, jobs):
            log(f"[{_stamp()}] {r.name}: submitted as job {j.job_id}")
    results: Dict[str, Optional[str]] = {}
    for r, j in zip(todo, jobs):
        try:
            j.results()   # every task's (a job of several nodes has one task per node; result() refuses it)
            results[r.name] = None
        except Exception as e:  # noqa: BLE001 - a failed job is reported, the others are collected
            msg = str(e).strip().splitlines()
            results[r.name] = next((l for l in reversed(msg) if "SweepError" in l or "error" in l.lower()),
                                   msg[-1] if msg else repr(e))
        log(f"[{_stamp()}] {r.name}: job {j.job_id} {results[r.name] or 'done'}")
        done()
    return results


def prepare(sw: Sweep, todo: Sequence[Run], log: Log) -> None:
    """Before the jobs: the data they need, built once in this process (each job re-checks under the
    lock), the token weights read from the built manifests, the resolved configs and sweep.json written."""
    write_configs(sw)
    for k in dict.fromkeys(k for r in todo for k in r.datasets):
        ensure_dataset(sw.datasets, k, sw.data_dir, log)
    for r in sw.runs:
        if all(sw.datasets[k].exists() for k in r.datasets if k in sw.datasets):
            refresh_token_weights(r)
    write_configs(sw)
