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
import subprocess

import pytest
import yaml

import slurm_cluster
from helpers import BUDGET, PY, ROOT, SWEEP, tiny_spec
from test_sweep_e2e import ONE_SIZE, check_finished_sweep
from tests.train._loopback_nodes import LoopbackNodes, NodesUnavailable

from megaslm.sweeps.expand import expand
from megaslm.sweeps.state import run_state

NODES = {"n1": "127.0.0.1", "n2": "127.0.0.2"}


@pytest.mark.slow
def test_sweep_run_on_two_slurm_nodes(tmp_path):
    try:
        env, stop = slurm_cluster.start(tmp_path, nodes=NODES)
    except slurm_cluster.Unavailable as e:
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
