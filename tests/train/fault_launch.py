"""Test driver: ``launchers/pretrain.py`` with a fault handed to the Trainer as an object
(``megaslm.train.Faults``), never through the environment or the production step.

    python tests/train/fault_launch.py --kill-during-save STEP <pretrain.py arguments>
    python tests/train/fault_launch.py --hold-in-step STEP FILE <pretrain.py arguments>

``--kill-during-save``: SIGKILLs rank 0 inside the checkpoint save of optimizer step STEP: after its tmp
directory is complete, before the rename (``Faults.before_commit``). Works under the deepspeed launcher
too (every rank runs this driver; only rank 0 commits, so only rank 0 dies, and the job with it).
``--hold-in-step``: waits inside step STEP (after its backward) until FILE exists, so that a test can act
on a run that is certainly still running (the computation is unchanged).
"""
import os
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "launchers"))

import pretrain  # noqa: E402

from megaslm.train import Faults  # noqa: E402


class KillDuringSave(Faults):
    def __init__(self, step: int):
        self.step = step

    def before_commit(self, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class HoldInStep(Faults):
    def __init__(self, step: int, release: str):
        self.step, self.release = step, release

    def after_backward(self, step: int, trainer) -> None:
        while step == self.step and not os.path.exists(self.release):
            time.sleep(0.05)


def main(argv):
    if "--hold-in-step" in argv:
        i = argv.index("--hold-in-step")
        return pretrain.main(argv[:i] + argv[i + 3:], faults=HoldInStep(int(argv[i + 1]), argv[i + 2]))
    i = argv.index("--kill-during-save")
    step = int(argv[i + 1])
    return pretrain.main(argv[:i] + argv[i + 2:], faults=KillDuringSave(step))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
