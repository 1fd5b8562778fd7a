"""The sweep's SLURM ``nodes: 2`` path, executed: a real two-node SLURM on this host (Debian's slurm-wlm is built
with multiple-slurmd support: two slurmd, nodes n1 and n2, each on its own port) and two ssh "nodes" (n1 ->
127.0.0.1, n2 -> 127.0.0.2 through a private sshd, tests/train/_loopback_nodes.py). One sweep run is submitted
as a 2-node job; its first task writes the hostfile from the allocation and trains DP=2 across n1 and n2 with
deepspeed over pdsh/ssh; the run ends evaluated with exactly its token budget.

Skips, saying why, where slurm-wlm + munge or openssh-server + pdsh are missing, without root, or where the
daemons do not start. Loopback only: each ssh node reports its own loopback address as ``hostname -I`` (what
DeepSpeed asks the first node for the rendezvous address) and gloo is pinned to ``lo``.
"""
import os
import shutil
import socket
import subprocess
import time

import pytest
import yaml

from helpers import BUDGET, PY, ROOT, SWEEP, tiny_spec
from test_sweep_e2e import ONE_SIZE, check_finished_sweep
from tests.train._loopback_nodes import LoopbackNodes, NodesUnavailable

from megaslm.sweep import expand, run_state

NODES = {"n1": "127.0.0.1", "n2": "127.0.0.2"}


class Unavailable(Exception):
    pass


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name):
    return shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)


def start_two_node_slurm(tmp):
    """munged + slurmctld + one slurmd per node (``slurmd -N n1`` / ``-N n2``); (client env, stop)."""
    for exe in ("slurmctld", "slurmd", "munged", "sbatch", "sinfo", "scontrol", "scancel", "squeue"):
        if _exe(exe) is None:
            raise Unavailable(f"{exe} not installed (apt-get install -y slurm-wlm munge)")
    if os.geteuid() != 0:
        raise Unavailable("starting slurmctld/slurmd/munged needs root")
    d = os.path.join(str(tmp), "slurm")
    for sub in ("state", "log", "munge", *(f"spool/{n}" for n in NODES)):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    host = socket.gethostname().split(".")[0]
    key = os.path.join(d, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    sock = os.path.join(d, "munge", "munge.socket")
    conf = os.path.join(d, "slurm.conf")
    node_lines = "".join(f"NodeName={n} NodeHostname={host} NodeAddr={a} Port={_free_port()} CPUs=1 State=UNKNOWN\n"
                         for n, a in NODES.items())
    with open(conf, "w") as f:
        # %n: each slurmd (one per node name) keeps its own spool, pid and log file
        f.write(f"""ClusterName=megaslmtwo
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
SlurmctldPort={_free_port()}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
{node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = dict(os.environ, SLURM_CONF=conf)
    procs = []

    def stop():
        if procs and all(p.poll() is None for p in procs):
            subprocess.run([_exe("scancel"), "--user=root"], env=env, capture_output=True)
            for _ in range(60):
                r = subprocess.run([_exe("squeue"), "-h"], env=env, capture_output=True, text=True)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def spawn(cmd):
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    try:
        spawn([_exe("munged"), "-F", "--force", f"--key-file={key}", f"--socket={sock}",
               f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge/seed"])
        for _ in range(50):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        else:
            raise Unavailable(f"munged did not start (see {d}/log/munged.log)")
        spawn([_exe("slurmctld"), "-D", "-i", "-f", conf])
        time.sleep(1.0)
        for n in NODES:
            spawn([_exe("slurmd"), "-D", "-N", n, "-f", conf])
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            for p in procs:
                if p.poll() is not None:
                    logs = "; ".join(f"{f}: {open(os.path.join(d, 'log', f)).read()[-600:]!r}"
                                     for f in sorted(os.listdir(os.path.join(d, "log"))) if f.startswith("slurm"))
                    raise Unavailable(f"{' '.join(p.args[:4])} exited with {p.returncode} ({logs})")
            r = subprocess.run([_exe("sinfo"), "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=env)
            state = r.stdout.strip()
            if r.returncode == 0 and sorted(state.splitlines()) == [f"{n} idle" for n in NODES]:
                return env, stop
            time.sleep(0.5)
        raise Unavailable(f"the two nodes did not become idle within 60 s (sinfo: {state!r}; logs in {d}/log)")
    except Exception:
        stop()
        raise


@pytest.mark.slow
def test_sweep_run_on_two_slurm_nodes(tmp_path):
    try:
        env, stop = start_two_node_slurm(tmp_path)
    except Unavailable as e:
        pytest.skip(f"no two-node SLURM here: {e}")
    nodes = LoopbackNodes(str(tmp_path / "ssh"), forward_env={"GLOO_SOCKET_IFNAME": "lo"}, aliases=NODES,
                          own_address=True)
    try:
        try:
            nodes.start()
        except NodesUnavailable as e:
            pytest.skip(f"no ssh 'nodes' for the job's deepspeed launch: {e}")
        # DP=2 (one rank per node): 2 sequences per rank per micro-batch, 4 per step as in the other sweep tests
        spec = tiny_spec(tmp_path, executor={"kind": "slurm", "nodes": 2, "time_min": 30, "cpus_per_task": 1},
                         sizes=ONE_SIZE, recipes=["en_fr"])
        s = yaml.safe_load(open(spec))
        s["overrides"] = [o.replace("micro_batch_size=4", "micro_batch_size=2") for o in s["overrides"]]
        assert "schedule.micro_batch_size=2" in s["overrides"]
        yaml.safe_dump(s, open(spec, "w"), sort_keys=False)
        env = nodes.launcher_env(dict(env, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
        r = subprocess.run([PY, SWEEP, "run", "--spec", spec], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=900)
        out = r.stdout[-3000:] + r.stderr[-3000:]
        assert r.returncode == 0, out
        assert r.stdout.count("submitted as job") == 1 and " done" in r.stdout, out
        check_finished_sweep(spec, n_runs=1)

        (run,) = expand(spec).runs
        assert run_state(run)["tokens_seen"] == BUDGET
        # the job had one task per node; the first wrote the hostfile from the allocation and launched deepspeed
        # once (the second task returned at once), which reached both nodes over ssh with n1 as the rendezvous
        job_dir = os.path.join(expand(spec).dir, "submitit")
        (job,) = [j for j in os.listdir(job_dir) if j.isdigit()]
        assert sorted(f for f in os.listdir(os.path.join(job_dir, job)) if f.endswith("_result.pkl")) == \
            [f"{job}_0_result.pkl", f"{job}_1_result.pkl"]
        assert open(os.path.join(run.dir, "hostfile")).read() == "n1 slots=1\nn2 slots=1\n"
        log = open(os.path.join(run.dir, "logs", "train.log")).read()
        assert sum(l.startswith("$ ") for l in log.splitlines()) == 1, log[-3000:]
        assert "--hostfile" in log and "Using IP address of 127.0.0.1 for node n1" in log, log[-3000:]
        for i, n in enumerate(NODES):
            assert f"{n}: " in log and f"nnodes=2, num_local_procs=1, node_rank={i}" in log, log[-3000:]
        assert "layout TP=1 PP=1 DP=2" in log, log[-3000:]
    finally:
        stop()          # cancels what is left of the job first
        nodes.stop()    # then whatever still runs in its ssh sessions
