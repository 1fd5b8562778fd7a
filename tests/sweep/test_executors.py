"""Executor plumbing that needs no cluster: the multi-node hostfile and the launch commands."""
import os
import shutil

import pytest

from megaslm.sweep import hostfile_from_slurm, train_command


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (slurm-wlm) not installed")
def test_hostfile_from_the_allocation(tmp_path, monkeypatch):
    # scontrol needs a slurm.conf to start (inside an allocation the cluster's); a minimal one here
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p Nodes=ALL\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-03],big7")
    path = hostfile_from_slurm(str(tmp_path / "hostfile"), gpus_per_node=8)
    assert open(path).read() == "gpu01 slots=8\ngpu02 slots=8\ngpu03 slots=8\nbig7 slots=8\n"


def test_no_allocation_no_hostfile(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    assert hostfile_from_slurm(str(tmp_path / "hostfile"), 8) is None


def test_train_commands():
    one = train_command("c.yaml", "py", gpus=0, nodes=1, hostfile=None)
    assert one[0] == "py" and one[1].endswith(os.path.join("launchers", "pretrain.py")) and one[-2:] == ["--config", "c.yaml"]
    node = train_command("c.yaml", "py", gpus=4, nodes=1, hostfile=None)
    assert node[:5] == ["py", "-m", "deepspeed.launcher.runner", "--num_gpus", "4"]
    multi = train_command("c.yaml", "py", gpus=8, nodes=2, hostfile="/x/hostfile")
    assert multi[3:7] == ["--hostfile", "/x/hostfile", "--num_gpus", "8"] and "--no_local_rank" in multi
    assert train_command("c.yaml", "py", gpus=2, nodes=1, hostfile=None, port=1234)[5:7] == ["--master_port", "1234"]


def test_a_run_held_by_another_process_is_refused(tmp_path):
    import fcntl
    import subprocess
    import sys

    from helpers import ROOT, tiny_spec

    from megaslm.sweep import SweepError, execute_run, expand, write_configs

    sw = expand(tiny_spec(tmp_path))
    write_configs(sw)
    run = sw.runs[0]
    os.makedirs(run.dir, exist_ok=True)
    # another process (think: a trainer whose sweep driver was killed) holds the run's lock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({os.path.join(run.dir, '.sweep.lock')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepError, match="another process is running it"):
            execute_run(os.path.join(sw.dir, "sweep.json"), run.name, lock_wait=1.0)
        assert not os.path.exists(os.path.join(run.dir, "logs", "train.log"))   # nothing started
    finally:
        holder.kill()
        holder.wait()
    lock = open(os.path.join(run.dir, ".sweep.lock"), "a")   # released with its holder
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
