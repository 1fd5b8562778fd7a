"""Which tokeniser made a unit file: the sidecar ``<stem>.units.json`` that ``tokenize`` writes beside
``<stem>.jsonl``, and its use by ``data_tools build`` (the dataset manifest's ``vocab.unit_source``).

``build`` refuses inputs made by different tokenisers (tokeniser, checkpoint hash, layer, k-means
codebook, codebook size or frame rate differ), inputs with a recorded tokeniser mixed with inputs
without one, and a ``--codebook-size`` / ``--frame-rate`` that contradicts the sidecar. Training
then refuses a dataset whose ``vocab.unit_source`` differs from the run config's ``vocab.unit_source``
(UnitVocab equality, megaslm/data.py:check_manifest), and evals a benchmark made by another tokeniser.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional

from data_tools.errors import DataError

SIDECAR_SUFFIX = ".units.json"


def sidecar_path(output: str) -> str:
    stem = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return stem + SIDECAR_SUFFIX


def read_sidecar(path: str) -> Optional[Dict]:
    sp = sidecar_path(path)
    if not os.path.exists(sp):
        return None
    try:
        with open(sp) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg})", path=sp, line=e.lineno) from None
    for k in ("unit_source", "codebook_size", "frame_rate"):
        if k not in d:
            raise DataError("missing (not a data_tools tokenize sidecar?)", path=sp, field=k)
    return d


def apply_unit_source(args, vocab):
    """``build``: the vocabulary with the inputs' common ``unit_source``; sets ``args.frame_rate`` from the
    sidecars when not given. Raises DataError naming the input on any mix or contradiction."""
    from data_tools.formats import InputSpec

    found = []
    for spec in args.input:
        path = InputSpec.parse(spec).path
        found.append((path, read_sidecar(path) if path.endswith(".jsonl") else None))
    known = [(p, s) for p, s in found if s is not None]
    if not known:
        return vocab
    p0, s0 = known[0]
    for p, s in found:
        if s is None:
            raise DataError(f"no tokeniser sidecar ({os.path.basename(sidecar_path(p))}) while {p0} was made by "
                            f"{s0['unit_source']}: units from different tokenisers cannot share a vocabulary", path=p)
        if s["unit_source"] != s0["unit_source"]:
            raise DataError(f"made by {s['unit_source']} but {p0} by {s0['unit_source']}: "
                            "units from different tokenisers cannot share a vocabulary", path=p)
    if vocab.codebook_size != s0["codebook_size"]:
        raise DataError(f"tokenised with {s0['codebook_size']} codes but --codebook-size is {vocab.codebook_size} "
                        f"(pass --codebook-size {s0['codebook_size']})", path=p0)
    if args.frame_rate is None:
        args.frame_rate = float(s0["frame_rate"])
    elif abs(args.frame_rate - s0["frame_rate"]) > 1e-9:
        raise DataError(f"tokenised at {s0['frame_rate']} units/s but --frame-rate is {args.frame_rate}", path=p0)
    return dataclasses.replace(vocab, unit_source=s0["unit_source"])
