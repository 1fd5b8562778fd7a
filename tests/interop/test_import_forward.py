"""Import (TWIST init) then forward: our model at TP=1 and TP=2 x PP=2 vs the Hugging Face model."""
import json

import pytest
import torch

from conftest import TOKENS, hf_logits
from megaslm.interop.hf import config_overrides_from_hf, qkv_to_megatron, read_hf_config
from tests.distributed import run_ranks

LAYOUTS = {"tp1": ["parallel.tensor=1", "parallel.pipeline=1"], "tp2pp2": ["parallel.tensor=2", "parallel.pipeline=2"]}


def _keep(hf_dir):
    # vocabulary kept: 3 specials + 125 units = 128 ids = the HF vocab_size, padded to 128 at TP 1 and 2
    return config_overrides_from_hf(read_hf_config(hf_dir)) + [
        f"model.init_from={hf_dir}", "model.init_new_rows=keep", "vocab.codebook_size=125",
        "model.make_vocab_size_divisible_by=64", "model.seq_length=16"]


def _replace(hf_dir, mode, tie):
    return config_overrides_from_hf(read_hf_config(hf_dir)) + [
        f"model.init_from={hf_dir}", f"model.init_new_rows={mode}", "vocab.codebook_size=300",
        f"model.tie_embeddings={tie}", "model.seq_length=16"] + LAYOUTS["tp2pp2"]


@pytest.fixture(scope="module")
def results(llama_dir, qwen2_dir):
    cases = []
    for arch, d in (("llama", llama_dir), ("qwen2", qwen2_dir)):
        for lay, ov in LAYOUTS.items():
            cases.append({"name": f"{arch}-{lay}", "overrides": _keep(d) + ov, "logits": True})
    cases.append({"name": "qwen2-mean-untied", "overrides": _replace(qwen2_dir, "mean", "false"), "gather": True})
    cases.append({"name": "llama-normal-tied", "overrides": _replace(llama_dir, "normal", "true"), "gather": True})
    per_rank = run_ranks(4, "interop_workers:import_forward", cases, TOKENS)
    out = {}
    for rank, res in enumerate(per_rank):
        for r in res:
            if r.get("logits") is not None:
                out.setdefault(r["name"], {})["logits"] = torch.from_numpy(r["logits"])
            if "tensors" in r:
                r["tensors"] = {k: torch.from_numpy(v) for k, v in r["tensors"].items()}
            if rank == 0:
                out.setdefault(r["name"], {}).update({k: v for k, v in r.items() if k != "logits"})
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_hf(results, llama_dir, qwen2_dir, arch, layout):
    ref = hf_logits({"llama": llama_dir, "qwen2": qwen2_dir}[arch], TOKENS)
    ours = results[f"{arch}-{layout}"]["logits"]
    assert ours.shape == ref.shape == (2, 12, 128)
    diff = (ours - ref).abs().max().item()
    print(f"{arch} {layout}: max |logit diff| = {diff:.3e} (logit scale {ref.abs().max().item():.2f})")
    assert diff < 1e-4


def _hf_tensors(d):
    from safetensors.torch import load_file

    return load_file(f"{d}/model.safetensors")


def test_vocab_replacement_mean(results, qwen2_dir):
    r = results["qwen2-mean-untied"]
    # 3 specials + 300 units = 303 ids, padded to a multiple of 128 x TP(2) = 256 -> 512
    assert r["padded_vocab"] == 512
    assert r["shapes"]["embedding.word_embeddings.weight"] == (512, 64)
    assert r["shapes"]["output_layer.weight"] == (512, 64)       # HF tied, ours untied: a new output matrix
    hf = _hf_tensors(qwen2_dir)
    mean = hf["model.embed_tokens.weight"].float().mean(0)
    for k in ("embedding.word_embeddings.weight", "output_layer.weight"):
        dev = (r["tensors"][k] - mean).abs()
        assert dev.max() < 0.02 and dev.mean() < 0.003, k       # mean + N(0, 0.002^2) noise
    # the transformer layers are the text model's (QKV interleaved per KV group, bias included, fc1 = [gate; up])
    p = "model.layers.1."
    qkv_w = qkv_to_megatron(*(hf[p + f"self_attn.{x}_proj.weight"] for x in "qkv"), groups=2)
    qkv_b = qkv_to_megatron(*(hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"), groups=2)
    assert torch.equal(r["tensors"]["decoder.layers.1.self_attention.linear_qkv.weight"], qkv_w)
    assert torch.equal(r["tensors"]["decoder.layers.1.self_attention.linear_qkv.bias"], qkv_b)
    fc1 = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
    assert torch.equal(r["tensors"]["decoder.layers.1.mlp.linear_fc1.weight"], fc1)


def test_vocab_replacement_normal(results):
    r = results["llama-normal-tied"]
    assert r["padded_vocab"] == 512
    assert r["shapes"]["embedding.word_embeddings.weight"] == (512, 64)
    assert "output_layer.weight" not in r["shapes"]            # tied: one matrix
    std = r["tensors"]["embedding.word_embeddings.weight"].std().item()
    assert abs(std - 0.02) < 0.002
