"""Continue a unit prompt with a trained model (through the sharded model, any TP/PP layout):
    python launchers/sample.py --checkpoint runs/tiny --prompt "5 17 17 42" --max-new 64 [a.b.c=value ...]

--checkpoint: a checkpoint, or a run directory / checkpoints folder (its newest checkpoint).
--prompt: raw unit ids (before the vocabulary offset), space- or comma-separated, or @file.json holding a
list. Prints one JSON line {"checkpoint", "prompt", "continuation"}; every rank samples the same units.
Multi-process: torchrun --nproc-per-node 2 launchers/sample.py ... parallel.tensor=2
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fail, parse  # noqa: E402


def _extra(p):
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True, help='unit ids "1 2 3" / "1,2,3" or @file.json')
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--add-bos", action="store_true", help="prefix bos (only if the training data had it)")


def _prompt(text: str):
    if text.startswith("@"):
        try:
            with open(text[1:]) as f:
                units = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--prompt {text}: cannot read a JSON list of unit ids ({e})") from None
    else:
        units = text.replace(",", " ").split()
    try:
        return [int(u) for u in units]
    except (TypeError, ValueError):
        raise ValueError(f"--prompt: expected integer unit ids, got {text!r}") from None


def main(argv=None) -> int:
    args, overrides = parse(__doc__.splitlines()[0], None, argv, extra=_extra)
    from megaslm.config import ConfigError
    from megaslm.vocab import VocabError

    from evals.checkpoint import find_checkpoints
    from evals.engine import load_checkpoint_model
    from evals.errors import EvalError
    from evals.generate import sample

    try:
        prompt = _prompt(args.prompt)
        ckpts = find_checkpoints(args.checkpoint)
        if not ckpts:
            raise EvalError(f"{args.checkpoint}: no checkpoint found")
        cfg, chunks = load_checkpoint_model(ckpts[-1], overrides)
        bad = [u for u in prompt if not 0 <= u < cfg.vocab.codebook_size]
        if bad:
            raise EvalError(f"--prompt: unit {bad[0]} outside the codebook [0, {cfg.vocab.codebook_size})")
        units = sample(chunks, cfg, prompt, max_new_units=args.max_new, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, add_bos=args.add_bos)
    except (EvalError, ConfigError, VocabError, ValueError) as e:
        fail(str(e))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps({"checkpoint": ckpts[-1], "prompt": prompt, "continuation": units}))
    from megaslm import parallel

    parallel.destroy()   # orderly teardown: every rank exits 0 together
    return 0


if __name__ == "__main__":
    sys.exit(main())
