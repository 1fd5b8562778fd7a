"""Audio -> discrete units (docs/audio.md): tokenisers (Mimi, HuBERT + k-means), sharded resumable
tokenisation under the training launchers, k-means training, benchmark converters.

Torch and transformers are imported only where a model runs (``tokenizers``), so the manifest and
provenance helpers stay cheap to import from ``data_tools build``.
"""
