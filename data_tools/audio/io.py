"""Reading audio: any format libsndfile reads (wav/flac/ogg, mp3 with libsndfile >= 1.1), any sample
rate (resampled), mixed to mono or one channel picked. Errors are one line naming the file."""
from __future__ import annotations

from fractions import Fraction
from typing import Optional, Tuple

import numpy as np

from data_tools.errors import DataError

MAX_MIX_CHANNELS = 2   # mono or stereo are mixed; more channels (surround, multi-mic) need --channel


class AudioError(DataError):
    """An audio file that cannot be tokenised (unreadable, empty, too short, wrong channels)."""


def audio_info(path: str) -> Tuple[int, int, int]:
    """(frames, sample rate, channels) from the header only."""
    import soundfile as sf
    try:
        info = sf.info(path)
    except Exception as e:  # noqa: BLE001 - libsndfile raises several types for unreadable files
        raise AudioError(f"unreadable audio ({_short(e)})", path=path) from None
    return int(info.frames), int(info.samplerate), int(info.channels)


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
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001
        raise AudioError(f"unreadable audio ({_short(e)})", path=path) from None
    n, ch = data.shape
    if n == 0 or ch == 0:
        raise AudioError("empty audio (0 samples)", path=path)
    check_channels(path, ch, channel)
    x = data.mean(axis=1) if channel is None else data[:, channel]
    x = np.ascontiguousarray(resample(x.astype(np.float32), sr, target_sr), dtype=np.float32)
    if x.shape[0] < min_samples:
        raise AudioError(f"too short: {n / sr:.4f} s; the tokeniser needs at least {min_samples / target_sr:.4f} s",
                         path=path)
    if not np.isfinite(x).all():
        raise AudioError("non-finite samples (NaN/inf)", path=path)
    return x
