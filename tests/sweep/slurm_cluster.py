"""A real single-node SLURM for the tests: Debian's slurm-wlm + munge, started here as root.

``start(tmp)`` installs nothing: it needs ``slurmctld``, ``slurmd``, ``munged`` and ``sbatch`` on PATH
(``apt-get install -y slurm-wlm munge``) and root; it writes a slurm.conf for this host into ``tmp``,
creates a munge key, starts munged / slurmctld / slurmd and waits for the node to be idle. Returns
(environment for the clients, stop function) or raises ``Unavailable`` with the reason.
"""
import os
import shutil
import socket
import subprocess
import time


class Unavailable(Exception):
    pass


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp):
    for exe in ("slurmctld", "slurmd", "munged", "sbatch", "sinfo", "scontrol"):
        if shutil.which(exe) is None and not os.path.exists(f"/usr/sbin/{exe}"):
            raise Unavailable(f"{exe} not installed (apt-get install -y slurm-wlm munge)")
    if os.geteuid() != 0:
        raise Unavailable("starting slurmctld/slurmd/munged needs root")
    d = os.path.join(str(tmp), "slurm")
    for sub in ("state", "spool", "log", "munge"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    host = socket.gethostname().split(".")[0]
    key = os.path.join(d, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    sock = os.path.join(d, "munge", "munge.socket")
    procs = []
    env = dict(os.environ)
    conf = os.path.join(d, "slurm.conf")
    cpus = os.cpu_count() or 1
    with open(conf, "w") as f:
        f.write(f"""ClusterName=megaslmtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
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
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env["SLURM_CONF"] = conf

    def stop():
        # end every job step first (a job step outlives slurmd and its srun waits for slurmctld forever)
        if len(procs) == 3 and all(p.poll() is None for p in procs):
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
        procs.append(subprocess.Popen([slurmd, "-D", "-f", conf], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.time() + 60
        state = ""
        while time.time() < deadline:
            for p in procs:
                if p.poll() is not None:
                    raise Unavailable(f"{p.args[0]} exited with {p.returncode} (logs in {d}/log)")
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env)
            state = r.stdout.strip()
            if r.returncode == 0 and state.startswith("idle"):
                return env, stop
            time.sleep(1.0)
        raise Unavailable(f"the node did not become idle within 60 s (sinfo: {state!r}; logs in {d}/log)")
    except Exception:
        stop()
        raise
