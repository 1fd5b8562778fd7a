"""Bad inputs: a clear one-line error naming the tensor or field. No process group needed."""
import json
import os
import shutil

import pytest
import torch

from conftest import make_llama
from megaslm.checkpoint import CheckpointError, read_checkpoint, safe_load
from megaslm.config_io import load_config
from megaslm.interop.errors import InteropError
from megaslm.interop.hf import config_overrides_from_hf, model_config_from_hf, open_hf_dir, read_hf_config


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _cfg(d, *extra):
    return load_config(None, config_overrides_from_hf(read_hf_config(d)) + [f"model.init_from={d}", *extra])


def test_good_dir_passes(llama_dir, qwen2_dir):
    for d in (llama_dir, qwen2_dir):
        open_hf_dir(d, _cfg(d))


def test_missing_tensor(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(llama_dir, tmp_path / "m")
    sd = load_file(f"{d}/model.safetensors")
    del sd["model.layers.2.mlp.up_proj.weight"]
    save_file(sd, f"{d}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"model\.layers\.2\.mlp\.up_proj\.weight' missing"):
        open_hf_dir(d, _cfg(d))


def test_shape_mismatch(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(llama_dir, tmp_path / "s")
    sd = load_file(f"{d}/model.safetensors")
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(sd, f"{d}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"k_proj\.weight' has shape \[16, 64\], expected \[64, 64\]"):
        open_hf_dir(d, _cfg(d))


def _edit_config(d, **kw):
    c = json.load(open(f"{d}/config.json"))
    c.update(kw)
    json.dump(c, open(f"{d}/config.json", "w"))


def test_unsupported_architecture(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "a")
    _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(InteropError, match=r"architectures=\['GPT2LMHeadModel'\]: unsupported architecture"):
        open_hf_dir(d)


def test_unsupported_rope_and_bias(llama_dir):
    hf = read_hf_config(llama_dir)
    with pytest.raises(InteropError, match=r"rope_parameters\.rope_type='yarn'"):
        model_config_from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})
    bad = {**hf, "rope_parameters": {**hf["rope_parameters"], "high_freq_factor": 2.0}}
    with pytest.raises(InteropError, match=r"rope_parameters\.high_freq_factor=2\.0"):
        model_config_from_hf(bad)
    with pytest.raises(InteropError, match=r"attention_bias=true"):
        model_config_from_hf({**hf, "attention_bias": True})


def test_config_disagrees(llama_dir):
    with pytest.raises(InteropError, match=r"model\.hidden_size: the config has 32 but .*config\.json gives 64"):
        open_hf_dir(llama_dir, _cfg(llama_dir, "model.hidden_size=32"))
    with pytest.raises(InteropError, match=r"model\.rotary_base"):
        open_hf_dir(llama_dir, _cfg(llama_dir, "model.rotary_base=10000"))
    with pytest.raises(InteropError, match=r"model\.init_new_rows: expected one of normal, mean, keep"):
        open_hf_dir(llama_dir, _cfg(llama_dir, "model.init_new_rows=zeros"))
    with pytest.raises(InteropError, match=r"init_new_rows=keep: the model's padded vocabulary \(32\) is smaller"):
        # 3 + 16 ids padded to 32 < the 128 text rows: keep cannot keep them
        open_hf_dir(llama_dir, _cfg(llama_dir, "model.init_new_rows=keep", "vocab.codebook_size=16",
                                    "model.make_vocab_size_divisible_by=16"))


def test_pickle_only_dir_refused(llama_dir, tmp_path):
    d = tmp_path / "p"
    os.makedirs(d)
    shutil.copy(f"{llama_dir}/config.json", d)
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(InteropError, match=r"no \*\.safetensors weights \(found pytorch_model\.bin"):
        open_hf_dir(str(d))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_unpickling_refused(tmp_path):
    d = tmp_path / "ck" / "step00000001"
    os.makedirs(d)
    torch.save({"module": {}, "payload": Evil()}, d / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=r"refused by torch\.load\(weights_only=True\)"):
        safe_load(str(d / "mp_rank_00_model_states.pt"))
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(str(d))
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint"):
        read_checkpoint(str(tmp_path))


def test_rope_scaling_matches_hf(llama_dir):
    """megatron's llama3 inv_freq == transformers' for the imported config (theta 5e5, factor 8)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    mc = model_config_from_hf(read_hf_config(llama_dir))
    ours = RotaryEmbedding(kv_channels=mc["kv_channels"], rotary_percent=1.0, rotary_base=mc["rotary_base"],
                           rope_scaling=True, rope_scaling_factor=mc["rope_scaling_factor"],
                           use_cpu_initialization=True, cp_group=object()).inv_freq
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(llama_dir), "cpu")
    assert torch.allclose(ours.float(), theirs.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, 1.0 / (500000 ** (torch.arange(0, 32, 2).float() / 32)))  # scaling did apply


def test_cli_one_line_error(tmp_path, capsys):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "launchers"))
    import convert

    with pytest.raises(SystemExit) as e:
        convert.main(["export-hf", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "checkpoint directory not found" in err and "\n" not in err
