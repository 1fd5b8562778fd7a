"""Hugging Face interoperability: import a text LM (TWIST init), export to HF, reshard checkpoints.

    hf.py          HF Llama / Qwen2 directory <-> canonical (TP=1, PP=1) tensors; vocabulary replacement
    checkpoint.py  read a DeepSpeed checkpoint of any TP/PP/ZeRO-0/1/2 layout into canonical tensors
                   (safetensors / torch.load(weights_only=True) only), export to an HF directory
    reshard.py     write a checkpoint of another layout (run inside the new layout's ranks)

Every user-facing failure is an ``InteropError`` (a ``ValueError``) whose message names the file,
tensor or config field.
"""
from megaslm.interop.errors import InteropError

__all__ = ["InteropError"]
