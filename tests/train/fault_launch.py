"""Test driver: ``launchers/pretrain.py`` with a fault handed to the Trainer as an object
(``megaslm.train.Faults``), never through the environment or the production step.

    python tests/train/fault_launch.py --kill-during-save STEP <pretrain.py arguments>

SIGKILLs rank 0 inside the checkpoint save of optimizer step STEP: after its tmp directory is complete,
before the rename (``Faults.before_commit``). Works under the deepspeed launcher too (every rank runs
this driver; only rank 0 commits, so only rank 0 dies, and the job with it).
"""
import os
import signal
import sys

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


def main(argv):
    i = argv.index("--kill-during-save")
    step = int(argv[i + 1])
    return pretrain.main(argv[:i] + argv[i + 2:], faults=KillDuringSave(step))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
