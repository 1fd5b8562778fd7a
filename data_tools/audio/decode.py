"""Listening to units: Mimi codes -> waveform.

Our units are Mimi's FIRST (semantic) codebook only. transformers' ``MimiModel.decode`` accepts codes with
fewer codebooks than the model has: the semantic RVQ level is dequantised and the acoustic residual
levels (7 in the released model at 8 codebooks, up to 31) are simply absent, i.e. the latent is what a
1-codebook Mimi stream would carry (~137 bit/s). The audio is therefore semantic-only: the timing and
a rough phonetic content come through, speaker identity, prosody detail and quality do not (expect
muffled, buzzy speech). That is enough to hear whether a continuation is speech-like and where it
pauses; it is not a fair judge of naturalness. HuBERT + k-means units cannot be decoded here
(that needs a separately trained unit vocoder, e.g. a HiFi-GAN on the same units).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from data_tools.common import atomic_path
from data_tools.errors import DataError


def decode_mimi_units(units: Sequence[int], model_dir: str, out_wav: str, unit_source: str = "") -> dict:
    """Write ``units`` (first-codebook Mimi codes) as a wav at Mimi's sample rate (temporary name, then rename).

    ``unit_source`` (the checkpoint's ``vocab.unit_source``) must name this very Mimi checkpoint."""
    import soundfile as sf
    import torch

    from data_tools.audio.tokenizers import checkpoint_hash, load_tokenizer
    if not unit_source:
        raise DataError("the checkpoint's vocab.unit_source is empty: nothing says its units are Mimi codes of "
                        f"{model_dir} (tokenise training audio with `data_tools tokenize` to record it)")
    if not unit_source.startswith("mimi:"):
        raise DataError(f"--wav: the model's units come from {unit_source}; only Mimi units can be decoded "
                        "(HuBERT k-means units need a unit vocoder)")
    h = checkpoint_hash(model_dir) if os.path.isdir(model_dir) else None
    if f"checkpoint={h}:" not in unit_source + ":":
        raise DataError(f"--tokenizer-dir {model_dir}: checkpoint hash {h} but the units were made by {unit_source}")
    tok = load_tokenizer("mimi", model_dir, device="cpu")
    u = np.asarray(list(units), dtype=np.int64)
    if u.size == 0:
        raise DataError("--wav: no units to decode")
    if u.min() < 0 or u.max() >= tok.codebook_size:
        raise DataError(f"--wav: unit {int(u.max())} outside Mimi's codebook [0, {tok.codebook_size})")
    with torch.inference_mode():
        audio = tok.model.decode(torch.from_numpy(u)[None, None]).audio_values[0, 0].float().numpy()
    os.makedirs(os.path.dirname(os.path.abspath(out_wav)), exist_ok=True)
    with atomic_path(out_wav, suffix=".wav") as tmp:      # soundfile takes the format from the extension
        sf.write(tmp, audio, tok.sample_rate)
    return {"wav": out_wav, "seconds": len(audio) / tok.sample_rate, "sample_rate": tok.sample_rate,
            "codebooks_used": 1}
