"""Reading audio: any format libsndfile reads (wav/flac/ogg, mp3 with libsndfile >= 1.1), any sample
rate (resampled), mixed to mono or one channel picked. Errors are one line naming the file."""
from __future__ import annotations

import os
import struct
from fractions import Fraction
from typing import Optional, Tuple

import numpy as np

from data_tools.errors import DataError

MAX_MIX_CHANNELS = 2   # mono or stereo are mixed; more channels (surround, multi-mic) need --channel


class AudioError(DataError):
    """An audio file that cannot be tokenised (unreadable, truncated, empty, too short, wrong channels)."""


def audio_info(path: str) -> Tuple[int, int, int]:
    """(frames, sample rate, channels) from the header only; AudioError for an unreadable file or one whose
    audio data is shorter than its header declares (``check_complete``)."""
    import soundfile as sf
    try:
        info = sf.info(path)
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types for unreadable files
        raise AudioError(f"unreadable audio ({_short(e)})", path=path) from None
    check_complete(path, int(info.frames), int(info.samplerate))
    return int(info.frames), int(info.samplerate), int(info.channels)


# The audio data chunk of the containers whose header declares its length in bytes: RIFF WAVE (little-endian;
# RIFX big-endian) and AIFF / AIFF-C. (An RF64 / W64 file or another format is not checked here: FLAC
# and Ogg carry their own framing, which libsndfile refuses when cut.)
_DATA_CHUNK = {(b"RIFF", b"WAVE"): ("<", b"data"), (b"RIFX", b"WAVE"): (">", b"data"),
               (b"FORM", b"AIFF"): (">", b"SSND"), (b"FORM", b"AIFC"): (">", b"SSND")}


def data_shortfall(path: str) -> Optional[Tuple[int, int]]:
    """(bytes declared, bytes present) of the audio data chunk of a WAV or AIFF file whose header declares more
    than the file holds (a broken or partial copy); None when it holds them all, for another format, or when
    the header leaves the length open (0 or 0xFFFFFFFF: what a streaming writer leaves before it finishes).

    libsndfile reads such a file without an error: it clamps the frame count to the bytes present (and says so
    only in its log), so the tokeniser would take a third of a recording for the whole of it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        kind = _DATA_CHUNK.get((head[:4], head[8:12]))
        if kind is None:
            return None
        order, target = kind
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, n = struct.unpack(order + "4sI", f.read(8))
            if cid == target:
                if n in (0, 0xFFFFFFFF):
                    return None
                present = size - (pos + 8)
                return (n, present) if n > present else None
            pos += 8 + n + (n & 1)           # chunks are padded to an even length
    return None


def check_complete(path: str, frames: int, sr: int) -> None:
    """AudioError when the file's audio data is shorter than its header declares (``data_shortfall``)."""
    short = data_shortfall(path)
    if short is None:
        return
    declared, present = short
    held = frames / sr if sr else 0.0
    whole = held * declared / present if present else float("nan")
    raise AudioError(f"truncated: the header declares {declared} bytes of audio data ({whole:.2f} s) but the file "
                     f"holds {present} ({held:.2f} s); expected the whole recording (a broken or partial copy?)",
                     path=path)


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def check_channels(path: str, channels: int, channel: Optional[int]) -> None:
    if channel is None:
        if channels > MAX_MIX_CHANNELS:
            raise AudioError(f"{channels} channels: expected mono or stereo to mix (pick one with --channel N)",
                             path=path)
    elif not 0 <= channel < channels:
        raise AudioError(f"--channel {channel} asked but the file has {channels} channel(s)", path=path)


def resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    """Polyphase resampling (scipy.signal.resample_poly: an anti-aliasing Kaiser FIR, exact rational ratio).
    torchaudio is not installed in the project's environment and torch has no resampler of its own;
    scipy is, and resample_poly is the standard band-limited resampler (the same method as torchaudio's
    sinc interpolation family), deterministic and length-exact: ceil(n * target / sr) samples."""
    if sr == target:
        return x
    from scipy.signal import resample_poly
    r = Fraction(target, sr)
    return resample_poly(x, r.numerator, r.denominator).astype(np.float32, copy=False)


def load_audio(path: str, target_sr: int, channel: Optional[int] = None, min_samples: int = 1) -> np.ndarray:
    """float32 mono samples at ``target_sr``; AudioError for unreadable, empty, too-short or wrong-channel audio."""
    import soundfile as sf
    try:
        with sf.SoundFile(path) as f:
            sr, declared = f.samplerate, f.frames
            data = f.read(dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001
        raise AudioError(f"unreadable audio ({_short(e)})", path=path) from None
    n, ch = data.shape
    if n == 0 or ch == 0:
        raise AudioError("empty audio (0 samples)", path=path)
    if n < declared:      # a format whose header frame count libsndfile reports as it is
        raise AudioError(f"truncated: decoded {n} of the {declared} frames the header declares "
                         f"({n / sr:.2f} s of {declared / sr:.2f} s); expected the whole recording (a broken or "
                         f"partial copy?)", path=path)
    check_complete(path, n, sr)
    check_channels(path, ch, channel)
    x = data.mean(axis=1) if channel is None else data[:, channel]
    x = np.ascontiguousarray(resample(x.astype(np.float32), sr, target_sr), dtype=np.float32)
    if x.shape[0] < min_samples:
        raise AudioError(f"too short: {n / sr:.4f} s; the tokeniser needs at least {min_samples / target_sr:.4f} s",
                         path=path)
    if not np.isfinite(x).all():
        raise AudioError("non-finite samples (NaN/inf)", path=path)
    return x
