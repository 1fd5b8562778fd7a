"""A real SLURM for the tests: Debian's slurm-wlm + munge, started here as root.

``start(tmp, nodes=None)`` installs nothing: it needs ``slurmctld``, ``slurmd``, ``munged`` and ``sbatch`` on
PATH (``apt-get install -y slurm-wlm munge``) and root; it writes a slurm.conf into ``tmp``, creates a munge
key, starts munged / slurmctld / slurmd and waits for every node to be idle. ``nodes=None``: one node, this
host. ``nodes={name: address}``: several nodes on this host, one slurmd each (``slurmd -N name``, its own
port; Debian's slurm-wlm is built with multiple-slurmd, and ``%n`` gives each its own spool, pid and log).
Returns (environment for the clients, stop function) or raises ``Unavailable`` with the reason.
"""
import os
import shutil
import socket
import subprocess
import time

from tests.distributed import free_port


class Unavailable(Exception):
    pass


def start(tmp, nodes=None):
    for exe in ("slurmctld", "slurmd", "munged", "sbatch", "sinfo", "scontrol", "scancel", "squeue"):
        if shutil.which(exe) is None and not os.path.exists(f"/usr/sbin/{exe}"):
            raise Unavailable(f"{exe} not installed (apt-get install -y slurm-wlm munge)")
    if os.geteuid() != 0:
        raise Unavailable("starting slurmctld/slurmd/munged needs root")
    d = os.path.join(str(tmp), "slurm")
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "log", "munge", *(f"spool/{n}" for n in (nodes or {host: None}))):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    key = os.path.join(d, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    sock = os.path.join(d, "munge", "munge.socket")
    procs = []
    env = dict(os.environ)
    conf = os.path.join(d, "slurm.conf")
    if nodes:
        node_lines = "".join(f"NodeName={n} NodeHostname={host} NodeAddr={a} Port={free_port()} CPUs=1 "
                             "State=UNKNOWN\n" for n, a in nodes.items())
    else:
        node_lines = f"NodeName={host} CPUs={os.cpu_count() or 1} Port={free_port()} State=UNKNOWN\n"
    with open(conf, "w") as f:
        f.write(f"""ClusterName=megaslmtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
SlurmctldPort={free_port()}
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
    env["SLURM_CONF"] = conf

    def stop():
        # end every job step first (a job step outlives slurmd and its srun waits for slurmctld forever)
        if len(procs) >= 3 and all(p.poll() is None for p in procs):
            subprocess.run(["scancel", "--user=root"], env=env, capture_output=True)
            for _ in range(60):
                r = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        for p in reversed(procs):
            try:
                p.terminate()
                p.wait(timeout=10)
            except Exception:  # noqa: BLE001
                p.kill()

    try:
        munged = shutil.which("munged") or "/usr/sbin/munged"
        procs.append(subprocess.Popen([munged, "-F", "--force", f"--key-file={key}", f"--socket={sock}",
                                       f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/log/munged.log",
                                       f"--seed-file={d}/munge/seed"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _ in range(50):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        else:
            raise Unavailable(f"munged did not start (see {d}/log/munged.log)")
        ctld = shutil.which("slurmctld") or "/usr/sbin/slurmctld"
        slurmd = shutil.which("slurmd") or "/usr/sbin/slurmd"
        procs.append(subprocess.Popen([ctld, "-D", "-i", "-f", conf], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        for n in (nodes or [None]):
            procs.append(subprocess.Popen([slurmd, "-D", *(["-N", n] if n else []), "-f", conf], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise Unavailable(f"{p.args[0]} exited with {p.returncode} (logs in {d}/log)")
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=env)
            state = r.stdout.strip()
            states = state.split()
            if r.returncode == 0 and len(states) == len(nodes or [host]) and all(t == "idle" for t in states):
                return env, stop
            time.sleep(1.0)
        raise Unavailable(f"the nodes did not become idle within 60 s (sinfo: {state!r}; logs in {d}/log)")
    except Exception:
        stop()
        raise
