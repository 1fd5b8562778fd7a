"""Export a checkpoint of any layout to a Hugging Face directory. Reading is ``megaslm.ckpt_io`` (the one
checkpoint reader of megaslm: DeepSpeed TP/PP/VPP, ZeRO-0/1/2 or canonical layouts, safe loading only);
its names are re-exported here for the interop users."""
from __future__ import annotations

from typing import Optional

import torch

from megaslm.ckpt_io import CheckpointError, read_checkpoint, resolve_tag_dir, safe_load  # noqa: F401


def export_hf(checkpoint: str, out_dir: str, arch: Optional[str] = None,
              dtype: Optional[torch.dtype] = None, config=None) -> str:
    """Checkpoint (any layout) -> HF directory loadable by AutoModelForCausalLM.from_pretrained offline."""
    from megaslm.interop.hf import save_hf

    cfg, full, _ = read_checkpoint(checkpoint, config)
    return save_hf(full, cfg, out_dir, arch=arch, dtype=dtype)
