"""data_tools: unit streams on disk -> megatron-core .bin/.idx datasets (+ language channel, manifest).

Entry point: ``python -m data_tools {build,bpe-train,bpe-encode,budget,inspect,demo} --help``.
Imports only numpy, megatron-core's dataset package, sentencepiece, tqdm, matplotlib and megaslm.vocab.
"""
from data_tools.errors import DataError

__all__ = ["DataError"]
