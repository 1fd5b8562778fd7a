"""Shared by the launchers: parse --config + overrides, one-line errors, quiet the dependency warnings a
user cannot act on, and the demo corpus.

The launchers are scripts (``deepspeed launchers/pretrain.py``, ``python launchers/eval.py``), not a package:
they import this module as ``from _common import ...``, which works because Python puts a script's own
folder first on ``sys.path``; everything else (megaslm, evals, data_tools) comes from the installed package
(``pip install -e .``, README)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import List, Optional, Tuple

# a bad flag is one line too (``error: PROG: what (see PROG --help)``, exit 2), as in data_tools. Nothing
# here imports torch: the launchers validate their config before it is imported (tests/test_launcher.py)
from data_tools.cli import OneLineArgumentParser as ArgumentParser
from megaslm.deps import kernels_name_clash

# Bit-reproducible CPU runs: OpenMP and MKL must not change their thread counts with the system load
# (with dynamic adjustment on, a busy machine can change the GEMM reduction order between two runs).
# Set before torch is imported (the launchers import this module first).
os.environ.setdefault("OMP_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

# megatron-core warns at import that TransformerEngine/Apex are missing (megaslm uses its local
# layer spec on purpose, see README) - once per module, so several times per command and per rank.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
# megatron-core 0.16 warns about its own default cuda_graph_scope when a TransformerConfig is built
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
# megatron-core's dataset builders log every index build/load at INFO and DeepSpeed its engine setup;
# keep their warnings and errors only
logging.getLogger("megatron").setLevel(logging.WARNING)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository (configs/ ...)


def parse(description: str, default_config: Optional[str], argv: Optional[List[str]] = None,
          extra=None) -> Tuple[argparse.Namespace, List[str]]:
    p = ArgumentParser(description=description)
    p.add_argument("--config", default=default_config,
                   help=f"YAML config (default: {os.path.relpath(default_config, os.getcwd()) if default_config else 'none'})")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    if extra:
        extra(p)
    p.add_argument("overrides", nargs="*", metavar="a.b.c=value", help="config overrides")
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args, args.overrides


def demo_data_dir(cfg) -> str:
    return os.path.join(cfg.output_dir, "data")


def prepare_demo_data(cfg, log=print) -> dict:
    """The synthetic EN/FR corpus built with data_tools' real pipeline into <output_dir>/data, once for all
    ranks (``data_tools.synthetic.prepare_demo_corpus``)."""
    from data_tools.synthetic import prepare_demo_corpus

    return prepare_demo_corpus(demo_data_dir(cfg), seed=cfg.data.seed, num_stories=cfg.data.demo_stories,
                               codebook_size=cfg.vocab.codebook_size, log=log)


def with_demo_data(cfg, prefixes: dict):
    """A new config whose stages without data train on the demo corpus's interleaved EN/FR stream."""
    from megaslm.data import with_default_data

    return with_default_data(cfg, prefixes["enfr_interleaved"])


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


# an installed Hugging Face 'kernels' shadows (or is shadowed by) our kernels package: say so in one line before
# any import fails with a message that names neither (megaslm/deps.py)
_CLASH = kernels_name_clash()
if _CLASH:
    fail(_CLASH)
