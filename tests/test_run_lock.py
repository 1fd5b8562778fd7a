"""One run per output_dir: the lock held by another live process is refused in one line naming its pid and
host; the kernel releases it when the holder is killed (-9 included), so no stale lock outlives a run."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from megaslm.checkpoint.lock import LOCK_NAME, RunDirInUse, RunLock, holder

HOLD = ("import sys, time\nfrom megaslm.checkpoint.lock import RunLock\n"
        "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)\n")


def test_second_holder_refused_and_kill_releases(tmp_path):
    out = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-c", HOLD, out], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    try:
        h = holder(out)
        assert h["pid"] == p.pid and h["host"] == socket.gethostname()
        with pytest.raises(RunDirInUse) as e:
            RunLock(out).acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"pid {p.pid}" in msg and socket.gethostname() in msg and out in msg
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert holder(out) is None            # released by the kernel with the process
    with RunLock(out) as lock:            # and free to take
        assert holder(out)["pid"] == os.getpid() and lock.fd is not None
    assert holder(out) is None and os.path.exists(os.path.join(out, LOCK_NAME))


def test_holder_of_a_directory_never_run(tmp_path):
    assert holder(str(tmp_path)) is None
    t0 = time.time()
    with RunLock(str(tmp_path / "new" / "dir")):
        pass
    assert time.time() - t0 < 5
