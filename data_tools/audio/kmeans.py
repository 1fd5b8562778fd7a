"""Fit the HuBERT unit codebook: MiniBatchKMeans (scikit-learn) on layer features of a sample of the corpus.

The codebook is a plain float32 ``(K, hidden)`` .npy (row k = centroid of unit k); ``HubertUnits``
assigns each frame to its nearest centroid (squared Euclidean distance), as the sklearn model would.
"""
from __future__ import annotations

from typing import List

import numpy as np

from data_tools.audio.io import load_audio
from data_tools.audio.manifest import AudioEntry
from data_tools.common import atomic_path
from data_tools.errors import DataError


def train_kmeans(entries: List[AudioEntry], tok, clusters: int, out_path: str, max_files: int = 1000,
                 max_frames: int = 1_000_000, seed: int = 0, batch_size: int = 8, channel=None,
                 progress: bool = True) -> dict:
    from sklearn.cluster import MiniBatchKMeans

    if clusters < 2:
        raise DataError(f"--clusters: expected at least 2, got {clusters}")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.permutation(len(entries))[:max_files].tolist()) if len(entries) > max_files else \
        list(range(len(entries)))
    feats, n = [], 0
    it = range(0, len(pick), batch_size)
    if progress:     # a bar on a TTY, else a line every --progress-every seconds
        from megaslm.progress import Progress
        it = Progress("tokenize-kmeans-train features", total=len(it), unit="batches").iterate(it)
    for j in it:
        waves = [load_audio(entries[i].path, tok.sample_rate, channel, tok.min_samples) for i in pick[j:j + batch_size]]
        for f in tok.features_batch(waves):
            feats.append(f)
            n += len(f)
        if n >= max_frames:
            break
    x = np.concatenate(feats)[:max_frames].astype(np.float32)
    if len(x) < clusters:
        raise DataError(f"only {len(x)} feature frames for {clusters} clusters: give more audio (--max-files) "
                        "or fewer --clusters")
    km = MiniBatchKMeans(n_clusters=clusters, random_state=seed, batch_size=min(10_000, len(x)), n_init=3,
                         max_no_improvement=50, compute_labels=False)
    km.fit(x)
    cents = km.cluster_centers_.astype(np.float32)
    with atomic_path(out_path, suffix=".npy") as tmp:     # np.save appends .npy to any other name
        np.save(tmp, cents)
    return {"codebook": out_path, "clusters": clusters, "dim": int(cents.shape[1]), "files": len(feats),
            "frames": int(len(x)), "inertia": float(km.inertia_) if hasattr(km, "inertia_") else None}
