"""Shared by the launchers: make the repository importable, parse --config + overrides, one-line errors."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse(description: str, default_config: Optional[str], argv: Optional[List[str]] = None,
          extra=None) -> Tuple[argparse.Namespace, List[str]]:
    p = argparse.ArgumentParser(description=description)
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


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)
