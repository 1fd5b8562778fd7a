"""Evaluate checkpoints on the paper's benchmarks:
    python launchers/eval.py --checkpoint runs/tiny --benchmarks bench/ --out runs/tiny/evals [a.b.c=value ...]

--checkpoint: one checkpoint (<run>/checkpoints/<tag>), a run directory (every checkpoint, in step
order) or its checkpoints/ folder. Overrides apply to the checkpoint's saved config: the eval layout
(parallel.tensor=2 parallel.pipeline=2; DP = the rest of the world) and eval.* (scoring, batch size,
max_items, add_bos). Multi-process: torchrun --nproc-per-node 4 launchers/eval.py ... (or deepspeed).
Writes results.json, results.md, evals.png (every benchmark vs step, with the run's evaluations during
training; a bar chart for one evaluated step), the newest checkpoint's N x N cross-lingual matrices
(xling_sTC.md/.png, xling_sSC.md/.png: rows = context language, columns = ending language; align_matrix.md/.png;
docs/evals.md) and <tag>.items.jsonl to --out.
"""
from __future__ import annotations

import os
import sys

from _common import fail, parse

from megaslm.progress import add_progress_option, apply_progress_option


def _extra(p):
    p.add_argument("--checkpoint", required=True, help="checkpoint, checkpoints/ folder or run directory")
    p.add_argument("--benchmarks", nargs="+", default=[], help="benchmark folders or .jsonl files (default: eval.benchmarks)")
    p.add_argument("--out", default=None, help="report folder (default: <checkpoint or run>/evals)")
    add_progress_option(p)


def main(argv=None) -> int:
    args, overrides = parse(__doc__.splitlines()[1].strip(), None, argv, extra=_extra)
    apply_progress_option(args.progress_every)
    from megaslm.config import ConfigError
    from megaslm.vocab import VocabError

    from evals.errors import EvalError
    from evals.preflight import preflight

    out = args.out or os.path.join(args.checkpoint, "evals")
    try:
        if args.config:
            raise EvalError("--config is not used: the config comes from the checkpoint (use a.b.c=value overrides)")
        # torch-free: the checkpoints, the overrides against their recorded configs and the benchmarks, all
        # refused in a fraction of a second, before torch's import (seconds) and the model
        checked = preflight(args.checkpoint, args.benchmarks, overrides)
        from evals.runner import evaluate_path

        evaluate_path(args.checkpoint, args.benchmarks, overrides, out, checked=checked)
    except (EvalError, ConfigError, VocabError) as e:
        fail(str(e))
    from megaslm import parallel

    parallel.destroy()   # orderly teardown: every rank exits 0 together
    return 0


if __name__ == "__main__":
    sys.exit(main())
