"""The launcher watch on a real process chain: a fake ``deepspeed`` runner (an executable of that name)
starts a child that watches its launchers; killing the runner alone is noticed within a second, and a
plain parent (this test) is not taken for a launcher."""
import os
import signal
import subprocess
import sys
import time

from megaslm import procwatch

CHILD = """
import sys, time
from megaslm.procwatch import LauncherWatch, launcher_chain
print("chain", len(launcher_chain()), flush=True)
hits = []
w = LauncherWatch(lambda pid, cmd: hits.append((pid, cmd)), interval=0.1)
t0 = time.time()
while not hits and time.time() - t0 < 20:
    time.sleep(0.05)
print("gone", hits[0][0] if hits else None, flush=True)
"""


def test_runner_killed_alone_is_noticed(tmp_path):
    runner = tmp_path / "deepspeed"   # argv[1] of the runner's process is this path: a launcher by its name
    runner.write_text(f"#!{sys.executable}\nimport subprocess, sys, time\n"
                      f"p = subprocess.Popen([sys.executable, '-c', {CHILD!r}], stdout=open({str(tmp_path / 'log')!r}, 'w'))\n"
                      "time.sleep(60)\n")
    runner.chmod(0o755)
    p = subprocess.Popen([str(runner)], start_new_session=True)
    log = tmp_path / "log"
    t0 = time.time()
    while "chain" not in (log.read_text() if log.exists() else ""):
        assert time.time() - t0 < 30
        time.sleep(0.05)
    assert "chain 1" in log.read_text()
    os.kill(p.pid, signal.SIGTERM)     # the runner only: its child keeps running, orphaned
    p.wait()
    t0 = time.time()
    while "gone" not in log.read_text():
        assert time.time() - t0 < 10, log.read_text()
        time.sleep(0.05)
    assert f"gone {p.pid}" in log.read_text()


def test_not_a_launcher():
    assert procwatch.launcher_chain() == [] or all(procwatch.is_launcher(procwatch._argv(pid))
                                                   for pid, _, _ in procwatch.launcher_chain())
    assert procwatch.is_launcher(["/v/bin/python", "/v/bin/deepspeed", "--num_gpus", "2", "train.py"])
    assert procwatch.is_launcher(["python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"])
    assert procwatch.is_launcher(["/usr/bin/torchrun", "--nproc_per_node", "2", "t.py"])
    assert not procwatch.is_launcher(["python", "-m", "pytest", "-k", "deepspeed"])
    assert not procwatch.is_launcher(["python", "tests/test_deepspeed_x.py"])
    # a recorded process that has exited (or whose pid was reused: another start time) is reported
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    st = procwatch._stat(p.pid)
    chain = [(p.pid, st[1], "x")]
    assert procwatch.gone(chain) is None
    assert procwatch.gone([(p.pid, st[1] + 1, "x")]) == (p.pid, "x")
    p.kill()
    p.wait()
    assert procwatch.gone(chain) == (p.pid, "x")
