"""Convert between Hugging Face models and megaslm checkpoints (docs/interop.md).

    python launchers/convert.py export-hf --checkpoint RUN/checkpoints --out HF_DIR [--arch A] [--dtype D]
    python launchers/convert.py import-hf --hf HF_DIR --out RUN [--config cfg.yaml] [a.b.c=value ...]
    python launchers/convert.py reshard --checkpoint RUN/checkpoints --out RUN2 parallel.tensor=1 ...

All three run in one process, without a DeepSpeed engine (under a launcher with several ranks, rank 0
does the work). import-hf and reshard write a layout-free checkpoint (weights, Adam moments, counters)
that training loads into the layout its config names. Errors are one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from _common import fail


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export-hf", help="checkpoint (any TP/PP/ZeRO-0/1/2 layout) -> Hugging Face directory")
    e.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir, or one tag dir")
    e.add_argument("--out", required=True)
    e.add_argument("--arch", default=None, choices=["LlamaForCausalLM", "Qwen2ForCausalLM"],
                   help="default: Qwen2ForCausalLM with QKV bias, LlamaForCausalLM without")
    e.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="default: fp32")
    e.add_argument("--config", default=None, help="run config, when none is saved with the checkpoint")
    i = sub.add_parser("import-hf", help="Hugging Face Llama/Qwen2 directory -> step-0 checkpoint (TWIST init)")
    i.add_argument("--hf", required=True)
    i.add_argument("--out", required=True, help="run directory to write (config.yaml + checkpoints/)")
    i.add_argument("--config", default=None, help="YAML config (the model shape is taken from the HF config)")
    i.add_argument("overrides", nargs="*", metavar="a.b.c=value")
    r = sub.add_parser("reshard", help="checkpoint -> checkpoint of another TP/PP/ZeRO layout")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--out", required=True, help="run directory to write (config.yaml + checkpoints/)")
    r.add_argument("--config", default=None, help="run config, when none is saved with the checkpoint")
    r.add_argument("overrides", nargs="*", metavar="parallel.tensor=1")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from megaslm.config import ConfigError
    from megaslm.interop.errors import InteropError

    try:
        if args.cmd == "export-hf":
            import torch

            from megaslm.interop.hf import export_hf

            dtype = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
            out = export_hf(args.checkpoint, args.out, arch=args.arch, dtype=dtype, config=args.config)
            print(f"wrote {out}")
        elif args.cmd == "import-hf":
            from megaslm.config_io import load_config
            from megaslm.interop.hf import config_overrides_from_hf, read_hf_config
            from megaslm.interop.reshard import import_hf

            hf = read_hf_config(args.hf)
            ov = config_overrides_from_hf(hf, os.path.join(args.hf, "config.json"))
            cfg = load_config(args.config, ov + [f"model.init_from={os.path.abspath(args.hf)}",
                                                 f"output_dir={args.out}"] + list(args.overrides))
            path = import_hf(cfg, args.out)
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"wrote {path}")
        elif int(os.environ.get("RANK", "0")) == 0:
            from megaslm.interop.reshard import reshard

            path = reshard(args.checkpoint, args.out, args.overrides, config=args.config)
            print(f"wrote {path}")
    except (InteropError, ConfigError) as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
