"""Continue a unit prompt with a trained model (through the sharded model, any TP/PP layout):
    python launchers/sample.py --checkpoint runs/tiny --prompt "5 17 17 42" --max-new 64 [a.b.c=value ...]

--checkpoint: a checkpoint, or a run directory / checkpoints folder (its newest checkpoint).
--prompt: raw unit ids (before the vocabulary offset), space- or comma-separated, or @file.json holding a
list. Prints one JSON line {"checkpoint", "prompt", "continuation"}; every rank samples the same units.
Multi-process: torchrun --nproc-per-node 2 launchers/sample.py ... parallel.tensor=2
--wav out.wav --tokenizer-dir MIMI_DIR: also write prompt + continuation as audio, decoded by the Mimi that
made the training units (first codebook only: semantic-only, poor audio; docs/audio.md "Listening").
"""
from __future__ import annotations

import json
import sys

from _common import fail, parse


def _extra(p):
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True, help='unit ids "1 2 3" / "1,2,3" or @file.json')
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--add-bos", action="store_true", help="prefix bos (only if the training data had it)")
    p.add_argument("--language", default=None,
                   help="the prompt's language (one of vocab.languages); required for a model trained with "
                        "model.language_embedding=true, ignored otherwise")
    p.add_argument("--wav", default=None, help="write prompt + continuation as audio (Mimi units only)")
    p.add_argument("--tokenizer-dir", default=None, help="--wav: the local Mimi folder that made the units")


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
    from megaslm.checkpoint.layout import list_checkpoints
    from megaslm.config import ConfigError
    from megaslm.vocab import VocabError

    from evals.engine import load_checkpoint_model
    from evals.errors import EvalError
    from evals.generate import sample

    try:
        if args.wav and not args.tokenizer_dir:
            raise ValueError("--wav needs --tokenizer-dir (the local Mimi model folder that made the units)")
        prompt = _prompt(args.prompt)
        ckpts = list_checkpoints(args.checkpoint)
        if not ckpts:
            raise EvalError(f"{args.checkpoint}: no checkpoint found")
        cfg, chunks = load_checkpoint_model(ckpts[-1], overrides)
        bad = [u for u in prompt if not 0 <= u < cfg.vocab.codebook_size]
        if bad:
            raise EvalError(f"--prompt: unit {bad[0]} outside the codebook [0, {cfg.vocab.codebook_size})")
        units = sample(chunks, cfg, prompt, max_new_units=args.max_new, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, add_bos=args.add_bos,
                       language=args.language)
    except (EvalError, ConfigError, VocabError, ValueError) as e:
        fail(str(e))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        out = {"checkpoint": ckpts[-1], "prompt": prompt, "continuation": units}
        if args.wav:
            from data_tools.audio.decode import decode_mimi_units
            from data_tools.errors import DataError
            try:
                out["audio"] = decode_mimi_units(prompt + units, args.tokenizer_dir, args.wav, cfg.vocab.unit_source)
            except DataError as e:
                fail(str(e))
        print(json.dumps(out))
    from megaslm import parallel

    parallel.destroy()   # orderly teardown: every rank exits 0 together
    return 0


if __name__ == "__main__":
    sys.exit(main())
