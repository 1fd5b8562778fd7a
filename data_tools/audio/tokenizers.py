"""Speech tokenisers from LOCAL model folders (no hub access: ``local_files_only``).

* ``mimi``: transformers' MimiModel, first (semantic) codebook only: 12.5 Hz, 2048 codes.
* ``hubert``: transformers' HubertModel, the output of transformer layer ``layer`` (1-based), each
  frame assigned to its nearest k-means centroid (a plain ``(K, D)`` .npy, see ``kmeans.py``).

Batching is exact (a file's units never depend on what else is in its batch):

* Mimi is causal end to end (causal convolutions, causal sliding-window attention), so right padding
  cannot reach earlier frames. Each file is zero-padded to a whole number of frames (1920 samples at
  24 kHz) before batching: then every layer's own "extra padding" is zero and frame t sees only the
  file's samples < (t+1)*hop. A file's units are exactly ``model.encode(file padded to whole frames)``;
  without that padding, the model's last, partial frame would be computed from the zeros the batch
  padding turns into at inner layers, which a lone call pads differently. ``padding_mask`` is not used:
  transformers' Mimi encoder does not honour it (see its TODO) and causality makes it unnecessary.
* HuBERT's conv front-end has no padding (frames inside the file see only the file's samples), but
  with ``feat_extract_norm="group"`` (HuBERT base, mHuBERT) its first GroupNorm normalises over
  the whole time axis, padding included: the front-end then runs per file, and only the transformer
  (which honours the attention mask: padded frames are zeroed before the positional conv and masked
  as keys) runs batched. With ``feat_extract_norm="layer"`` (per-frame norm) the front-end is batched too.
"""
from __future__ import annotations

import abc
import glob
import hashlib
import json
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from data_tools.errors import DataError

TOKENIZERS = ("mimi", "hubert")


def checkpoint_hash(model_dir: str, extra_files: Sequence[str] = ()) -> str:
    """sha256 over the model folder's config and weight files (names and bytes, sorted), 12 hex digits."""
    files = sorted(glob.glob(os.path.join(model_dir, "*.json")) + glob.glob(os.path.join(model_dir, "*.safetensors"))
                   + glob.glob(os.path.join(model_dir, "*.bin")))
    files = [f for f in files if os.path.basename(f) not in ("preprocessor_config.json",)] + list(extra_files)
    if not files:
        raise DataError("no config/weights (*.json, *.safetensors, *.bin) in the model folder", path=model_dir)
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.basename(f).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def _device_dtype(device: Optional[str], dtype: str = "auto"):
    import torch
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype not in ("auto", "bf16", "fp32"):
        raise DataError(f"--dtype {dtype!r}: expected auto, bf16 or fp32")
    # auto: bf16 on GPU (throughput), fp32 on CPU (CPU bf16 is slow and gains nothing). Codebook / k-means
    # distances are computed in fp32 either way.
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    return dev, (torch.bfloat16 if dtype == "bf16" else torch.float32)


class UnitTokenizer(abc.ABC):
    """The interface both tokenisers (Mimi, HuBERT + k-means) implement."""

    name = ""
    sample_rate: int
    frame_rate: float
    codebook_size: int
    min_samples: int = 1

    @abc.abstractmethod
    def describe(self) -> Dict:
        """Implemented by each tokeniser."""

    @property
    def unit_source(self) -> str:
        d = self.describe()
        return ":".join([d["tokenizer"]] + [f"{k}={d[k]}" for k in ("checkpoint", "layer", "kmeans", "codebook_size",
                                                                       "frame_rate") if d.get(k) is not None])

    @abc.abstractmethod
    def num_frames(self, n_samples: int) -> int:
        """Implemented by each tokeniser."""

    @abc.abstractmethod
    def encode_batch(self, waves: List[np.ndarray]) -> List[np.ndarray]:
        """Implemented by each tokeniser."""


class MimiUnits(UnitTokenizer):
    name = "mimi"

    def __init__(self, model_dir: str, device: Optional[str] = None, dtype: str = "auto"):
        import torch
        from transformers import MimiModel
        self.model_dir = model_dir
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise DataError("not a Mimi model folder (config.json missing)", path=model_dir)
        self.device, self.dtype = _device_dtype(device, dtype)
        self.model = MimiModel.from_pretrained(model_dir, local_files_only=True, dtype=self.dtype).to(self.device).eval()
        c = self.model.config
        self.sample_rate = int(c.sampling_rate)
        self.frame_rate = float(c.frame_rate)
        hop = self.sample_rate / self.frame_rate
        if abs(hop - round(hop)) > 1e-6:
            raise DataError(f"frame rate {self.frame_rate} does not divide the sample rate {self.sample_rate}",
                            path=model_dir)
        self.hop = int(round(hop))
        self.codebook_size = int(c.codebook_size)
        self.hash = checkpoint_hash(model_dir)
        self._torch = torch

    def describe(self) -> Dict:
        return {"tokenizer": "mimi", "checkpoint": self.hash, "model_dir": os.path.abspath(self.model_dir),
                "layer": None, "codebook": 0, "kmeans": None, "codebook_size": self.codebook_size,
                "frame_rate": self.frame_rate, "sample_rate": self.sample_rate}

    def num_frames(self, n_samples: int) -> int:
        return -(-n_samples // self.hop)

    def pad_to_frames(self, x: np.ndarray) -> np.ndarray:
        n = self.num_frames(len(x)) * self.hop
        return np.pad(x, (0, n - len(x))) if n > len(x) else x

    def encode_batch(self, waves: List[np.ndarray]) -> List[np.ndarray]:
        torch = self._torch
        frames = [self.num_frames(len(w)) for w in waves]
        batch = np.zeros((len(waves), 1, max(frames) * self.hop), dtype=np.float32)
        for i, w in enumerate(waves):
            batch[i, 0, : len(w)] = w
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, self.dtype)
            codes = self.model.encode(x, num_quantizers=1).audio_codes[:, 0, :].cpu().numpy()
        return [codes[i, :f].astype(np.int64) for i, f in enumerate(frames)]


class HubertUnits(UnitTokenizer):
    name = "hubert"

    def __init__(self, model_dir: str, layer: int, kmeans: Optional[str] = None, device: Optional[str] = None,
                 dtype: str = "auto"):
        import torch
        from transformers import HubertModel
        self.model_dir, self.layer, self.kmeans_path = model_dir, int(layer), kmeans
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise DataError("not a HuBERT model folder (config.json missing)", path=model_dir)
        self.device, self.dtype = _device_dtype(device, dtype)
        model = HubertModel.from_pretrained(model_dir, local_files_only=True, dtype=self.dtype)
        c = model.config
        if not 1 <= self.layer <= c.num_hidden_layers:
            raise DataError(f"--layer {layer}: expected 1..{c.num_hidden_layers} (output of that transformer layer)",
                            path=model_dir)
        # Layers above the chosen one are never needed: drop them (compute), keep a hook on the chosen one.
        model.encoder.layers = model.encoder.layers[: self.layer]
        self.model = model.to(self.device).eval()
        self._captured = None
        self.model.encoder.layers[self.layer - 1].register_forward_hook(self._capture)
        pp = {}
        ppath = os.path.join(model_dir, "preprocessor_config.json")
        if os.path.isfile(ppath):
            with open(ppath) as f:
                pp = json.load(f)
        self.sample_rate = int(pp.get("sampling_rate", 16000))
        self.normalize = bool(pp.get("do_normalize", False))
        self.kernels, self.strides = list(c.conv_kernel), list(c.conv_stride)
        self.frame_rate = self.sample_rate / math.prod(self.strides)
        self.min_samples = 1
        while self.num_frames(self.min_samples) < 1:
            self.min_samples += 1
        self.batched_frontend = c.feat_extract_norm == "layer"
        self.hash = checkpoint_hash(model_dir)
        self.centroids = None
        self.kmeans_hash = None
        if kmeans is not None:
            try:
                cents = np.load(kmeans, allow_pickle=False)
            except Exception as e:  # noqa: BLE001
                raise DataError(f"cannot read the k-means codebook ({e})", path=kmeans) from None
            if cents.ndim != 2 or cents.shape[1] != c.hidden_size or cents.dtype.kind != "f":
                raise DataError(f"expected a float (K, {c.hidden_size}) centroid array, got {cents.dtype} "
                                f"{cents.shape}", path=kmeans)
            self.centroids = torch.from_numpy(cents.astype(np.float32)).to(self.device)
            self.kmeans_hash = hashlib.sha256(cents.astype(np.float32).tobytes()).hexdigest()[:12]
        self.codebook_size = int(self.centroids.shape[0]) if self.centroids is not None else 0
        self._torch = torch

    def _capture(self, module, inputs, output):
        self._captured = output[0] if isinstance(output, tuple) else output

    def describe(self) -> Dict:
        return {"tokenizer": "hubert", "checkpoint": self.hash, "model_dir": os.path.abspath(self.model_dir),
                "layer": self.layer, "kmeans": self.kmeans_hash,
                "kmeans_path": os.path.abspath(self.kmeans_path) if self.kmeans_path else None,
                "codebook_size": self.codebook_size, "frame_rate": self.frame_rate, "sample_rate": self.sample_rate}

    def num_frames(self, n_samples: int) -> int:
        n = n_samples
        for k, s in zip(self.kernels, self.strides):
            n = (n - k) // s + 1
            if n < 1:
                return 0
        return n

    def features_batch(self, waves: List[np.ndarray]) -> List[np.ndarray]:
        """Layer features (float32, (frames, hidden)) of each file, computed batched and exactly."""
        torch = self._torch
        waves = [((w - w.mean()) / np.sqrt(w.var() + 1e-7)).astype(np.float32) if self.normalize else w
                 for w in waves]
        frames = [self.num_frames(len(w)) for w in waves]
        T = max(frames)
        m = self.model
        with torch.inference_mode():
            if self.batched_frontend:
                batch = np.zeros((len(waves), max(len(w) for w in waves)), dtype=np.float32)
                for i, w in enumerate(waves):
                    batch[i, : len(w)] = w
                feats = m.feature_extractor(torch.from_numpy(batch).to(self.device, self.dtype))[:, :, :T]
            else:
                feats = torch.zeros((len(waves), m.config.conv_dim[-1], T), device=self.device, dtype=self.dtype)
                for i, w in enumerate(waves):
                    feats[i, :, : frames[i]] = m.feature_extractor(
                        torch.from_numpy(w)[None].to(self.device, self.dtype))[0]
            mask = torch.zeros((len(waves), T), dtype=torch.bool, device=self.device)
            for i, f in enumerate(frames):
                mask[i, :f] = True
            # as HubertModel.forward does, with the frame mask passed to the encoder
            hidden = m.feature_projection(feats.transpose(1, 2))
            self._captured = None
            m.encoder(hidden, attention_mask=mask)
            out = self._captured.float().cpu().numpy()
        return [out[i, :f] for i, f in enumerate(frames)]

    def assign(self, feats: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(feats).to(self.device, torch.float32)
        c = self.centroids
        d = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]
        return d.argmin(1).cpu().numpy().astype(np.int64)

    def encode_batch(self, waves: List[np.ndarray]) -> List[np.ndarray]:
        if self.centroids is None:
            raise DataError("a HuBERT tokeniser needs a k-means codebook (--kmeans FILE.npy; "
                            "fit one with `python -m data_tools tokenize-kmeans-train`)")
        return [self.assign(f) for f in self.features_batch(waves)]


def check_tokenizer(kind: str, model_dir: str, layer: Optional[int] = None, kmeans: Optional[str] = None) -> None:
    """The tokeniser arguments' errors, said before torch and transformers are imported (seconds of CPU)."""
    if kind not in TOKENIZERS:
        raise DataError(f"--tokenizer {kind!r}: expected one of {list(TOKENIZERS)}")
    if not model_dir or not os.path.isdir(model_dir):
        raise DataError("model folder not found (a local directory: no hub downloads)", path=model_dir)
    if kind == "hubert" and layer is None:
        raise DataError("--layer is required for the HuBERT tokeniser (e.g. 6 for base, 11 for mHuBERT)")
    if kind == "hubert" and kmeans is not None and not os.path.isfile(kmeans):
        raise DataError("k-means codebook not found", path=kmeans)


def load_tokenizer(kind: str, model_dir: str, layer: Optional[int] = None, kmeans: Optional[str] = None,
                   device: Optional[str] = None, dtype: str = "auto") -> UnitTokenizer:
    check_tokenizer(kind, model_dir, layer, kmeans)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise next to our own progress
    if kind == "mimi":
        return MimiUnits(model_dir, device, dtype)
    return HubertUnits(model_dir, layer, kmeans, device, dtype)
