"""Hugging Face interoperability: import a text LM (TWIST init), export to HF, reshard checkpoints.

    hf.py          HF Llama / Qwen2 directory <-> canonical (TP=1, PP=1) tensors; vocabulary replacement;
                   ``export_hf``: a checkpoint of any layout (read by ``megaslm.checkpoint.reader``) -> HF
    hf_extras.py   the export's unit tokenizer and generation config; atomic commit of save_pretrained output
    hf_card.py     the export's model card (README.md) from the run's records (torch-free)
    reshard.py     write a checkpoint of another layout (run inside the new layout's ranks)

A bad Hugging Face directory, tensor or conversion request is an ``InteropError``; a checkpoint that
cannot be read is the checkpoint package's ``CheckpointError``. Both are ``ValueError``s whose one-line
message names the file, tensor or config field (``launchers/convert.py`` prints either and exits 2).
"""
from megaslm.interop.errors import InteropError

__all__ = ["InteropError"]
