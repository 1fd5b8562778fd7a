"""Interop tests: tiny Hugging Face Llama / Qwen2 models with random weights, saved locally (no hub)."""
import os
import sys

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_HERE = os.path.dirname(os.path.abspath(__file__))
for p in (_ROOT, _HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    if model.config.tie_word_embeddings:
        model.tie_weights()


def make_llama(path, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, max_position_embeddings=16384,
                rope_theta=500000.0, tie_word_embeddings=False,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192})
    conf.update(kw)
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**conf))
    _randomise(m, 1)
    m.save_pretrained(path)
    return str(path)


def make_qwen2(path, **kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    conf = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512, rope_theta=1000000.0,
                tie_word_embeddings=True)
    conf.update(kw)
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(**conf))
    _randomise(m, 2)
    m.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    return make_qwen2(tmp_path_factory.mktemp("hf") / "qwen2")


def hf_logits(path, tokens):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        return m(torch.tensor(tokens)).logits.float()


TOKENS = [[1, 5, 17, 99, 3, 64, 127, 42, 8, 8, 100, 2], [1, 120, 33, 7, 7, 7, 90, 11, 126, 4, 56, 77]]
