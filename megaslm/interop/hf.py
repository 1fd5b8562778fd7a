"""Hugging Face Llama / Qwen2 <-> our GPTModel, through canonical (TP=1, PP=1) tensor names.

Import (TWIST): ``load_hf_into_chunks(chunks, cfg, hf_dir)`` fills this rank's shards from an HF
directory (config.json + *.safetensors), whatever the TP/PP layout: every canonical full tensor is
built from the HF tensors and sliced by ``megaslm.sharding.ParamSpec.shard``. The text vocabulary is
replaced by the unit vocabulary (``cfg.padded_vocab_size()`` rows), new rows set by
``model.init_new_rows``:

    normal  every row ~ N(0, model.init_method_std)                          (default)
    mean    every row = mean of the text rows + N(0, (0.1 * init_method_std)^2) noise
    keep    row i = text row i for i < min(V_text, V_padded), rows beyond ~ N(0, std); needs
            V_padded >= V_text. For checks and continued text training: pick a vocabulary whose padded
            size equals the text one (e.g. codebook_size = V_text - 3 and make_vocab_size_divisible_by
            a divisor of V_text / TP); then the model computes exactly the HF model's function.

Rows are drawn as full tensors from a generator seeded by (run seed, canonical name), so every layout
gets the same weights. Mapping (HF -> canonical, layer i):

    model.embed_tokens.weight                 embedding.word_embeddings.weight
    layers.i.input_layernorm.weight           decoder.layers.i.input_layernorm.weight
    layers.i.post_attention_layernorm.weight  decoder.layers.i.pre_mlp_layernorm.weight
    layers.i.self_attn.{q,k,v}_proj.{weight,bias}  decoder.layers.i.self_attention.linear_qkv.{weight,bias}
        (megatron's per-KV-group layout: for each group g, [q rows of g's heads; k rows of g; v rows of g])
    layers.i.self_attn.o_proj.weight          decoder.layers.i.self_attention.linear_proj.weight
    layers.i.mlp.{gate,up}_proj.weight        decoder.layers.i.mlp.linear_fc1.weight = [gate; up]
    layers.i.mlp.down_proj.weight             decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                         decoder.final_layernorm.weight
    lm_head.weight (untied)                   output_layer.weight

Only safetensors files are read (no pickle).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from megaslm import sharding
from megaslm.deps import kernels_name_clash
from megaslm.fsutil import atomic_path, atomic_write_text
from megaslm.interop.errors import InteropError
from megaslm.sharding import EMB, OUT

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
INIT_MODES = ("normal", "mean", "keep")


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------
def read_hf_config(path: str) -> Dict[str, Any]:
    f = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise InteropError(f"{path}: Hugging Face model directory not found")
    try:
        with open(f) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise InteropError(f"{f}: not found (expected a Hugging Face model directory with config.json)") from None
    except json.JSONDecodeError as e:
        raise InteropError(f"{f}: line {e.lineno}: invalid JSON ({e.msg})") from None


def hf_model_type(hf: Dict[str, Any], where: str = "config.json") -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[a]
    if archs:
        raise InteropError(f"{where}: architectures={archs}: unsupported architecture "
                           f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    mt = hf.get("model_type")
    if mt in SUPPORTED_ARCHITECTURES.values():
        return mt
    raise InteropError(f"{where}: model_type={mt!r}: unsupported architecture "
                       f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")


def _need(hf, key, where):
    if key not in hf or hf[key] is None:
        raise InteropError(f"{where}: field {key!r} missing")
    return hf[key]


def hf_rope(hf: Dict[str, Any], where: str = "config.json") -> Tuple[float, Optional[float]]:
    """(rope theta, llama3 scaling factor or None). transformers 5 writes ``rope_parameters``; older
    versions ``rope_theta`` + ``rope_scaling``: both are read."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **{k: v for k, v in params.items() if k != "rope_theta"}}
    rtype = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rtype == "default":
        return float(theta), None
    if rtype != "llama3":
        raise InteropError(f"{where}: rope_parameters.rope_type={rtype!r} is not supported "
                           f"(supported: default, llama3)")
    # megatron-core applies Llama-3.1 scaling with fixed low/high frequency factors and original length
    for key, want in (("low_freq_factor", 1.0), ("high_freq_factor", 4.0), ("original_max_position_embeddings", 8192)):
        got = scaling.get(key, want)
        if float(got) != float(want):
            raise InteropError(f"{where}: rope_parameters.{key}={got!r} is not supported "
                               f"(megatron-core's llama3 RoPE scaling uses {want})")
    return float(theta), float(_need(scaling, "factor", where + ": rope_parameters"))


def model_config_from_hf(hf: Dict[str, Any], where: str = "config.json") -> Dict[str, Any]:
    """ModelConfig fields (``model.*``) that describe the same network as an HF Llama/Qwen2 config."""
    kind = hf_model_type(hf, where)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise InteropError(f"{where}: hidden_act={act!r} is not supported (SwiGLU with silu only)")
    if kind == "llama":
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise InteropError(f"{where}: {key}=true is not supported for Llama (no linear biases in our model)")
        qkv_bias = False
    else:
        if hf.get("use_sliding_window"):
            raise InteropError(f"{where}: use_sliding_window=true is not supported (full causal attention only)")
        qkv_bias = True
    heads = int(_need(hf, "num_attention_heads", where))
    hidden = int(_need(hf, "hidden_size", where))
    head_dim = hf.get("head_dim") or hidden // heads
    theta, factor = hf_rope(hf, where)
    if not float(theta).is_integer():
        raise InteropError(f"{where}: rope_theta={theta!r}: our model.rotary_base is an integer")
    out = {
        "num_layers": int(_need(hf, "num_hidden_layers", where)),
        "hidden_size": hidden,
        "ffn_hidden_size": int(_need(hf, "intermediate_size", where)),
        "num_attention_heads": heads,
        "num_query_groups": int(hf.get("num_key_value_heads") or heads),
        "kv_channels": int(head_dim),
        "rotary_base": int(theta),
        "rope_scaling": factor is not None,
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "add_qkv_bias": qkv_bias,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    if factor is not None:
        out["rope_scaling_factor"] = factor
    return out


def config_overrides_from_hf(hf: Dict[str, Any], where: str = "config.json") -> List[str]:
    """The same as ``a.b.c=value`` overrides for ``load_config``."""
    return [f"model.{k}={json.dumps(v)}" for k, v in model_config_from_hf(hf, where).items()]


def check_model_config(cfg, hf: Dict[str, Any], where: str = "config.json") -> None:
    """The training config's ``model`` section must describe the HF network; error names the field."""
    mode = cfg.model.init_new_rows
    if mode not in INIT_MODES:
        raise InteropError(f"model.init_new_rows: expected one of {', '.join(INIT_MODES)}, got {mode!r}")
    want = model_config_from_hf(hf, where)
    m = cfg.model
    for key, hv in want.items():
        if key == "tie_embeddings" and mode != "keep":
            continue  # the vocabulary matrices are new anyway: tying may change
        ours = cfg.head_dim if key == "kv_channels" else getattr(m, key)
        if key == "rope_scaling_factor" and not m.rope_scaling:
            continue
        same = math.isclose(float(ours), float(hv), rel_tol=1e-9) if isinstance(hv, float) else ours == hv
        if not same:
            raise InteropError(f"model.{key}: the config has {ours!r} but {where} gives {hv!r}")


# ------------------------------------------------------------------------------------------------
# safetensors directory
# ------------------------------------------------------------------------------------------------
class SafetensorsDir:
    """Lazy, pickle-free access to the tensors of an HF directory (single file or sharded index)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        files: List[str]
        if os.path.exists(index):
            with open(index) as f:
                wm = json.load(f).get("weight_map", {})
            files = sorted(set(wm.values()))
        else:
            files = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
        if not files:
            bins = [x for x in os.listdir(path) if x.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {bins[0]}: pickle checkpoints are not loaded; convert it to safetensors)" if bins else ""
            raise InteropError(f"{path}: no *.safetensors weights{hint}")
        self._where: Dict[str, Any] = {}
        self._handles = []
        for fname in files:
            fp = os.path.join(path, fname)
            if not os.path.exists(fp):
                raise InteropError(f"{fp}: listed in model.safetensors.index.json but not found")
            h = safe_open(fp, framework="pt")
            self._handles.append(h)
            for k in h.keys():
                self._where[k] = h

    def names(self):
        return self._where.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise InteropError(f"{self.path}: tensor {name!r} missing")
        return self._where[name].get_tensor(name).to(torch.float32)


def expected_hf_shapes(hf: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    mc = model_config_from_hf(hf)
    h, f, L = mc["hidden_size"], mc["ffn_hidden_size"], mc["num_layers"]
    d, nh, ng = mc["kv_channels"], mc["num_attention_heads"], mc["num_query_groups"]
    V = int(_need(hf, "vocab_size", "config.json"))
    out = {"model.embed_tokens.weight": (V, h), "model.norm.weight": (h,)}
    if not mc["tie_embeddings"]:
        out["lm_head.weight"] = (V, h)
    for i in range(L):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (nh * d, h),
            p + "self_attn.k_proj.weight": (ng * d, h),
            p + "self_attn.v_proj.weight": (ng * d, h),
            p + "self_attn.o_proj.weight": (h, nh * d),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        })
        if mc["add_qkv_bias"]:
            out.update({p + "self_attn.q_proj.bias": (nh * d,), p + "self_attn.k_proj.bias": (ng * d,),
                        p + "self_attn.v_proj.bias": (ng * d,)})
    return out


def open_hf_dir(path: str, cfg=None) -> Tuple[Dict[str, Any], SafetensorsDir]:
    """Read and fully validate an HF directory (config, every tensor's presence and shape) before any copy."""
    hf = read_hf_config(path)
    where = os.path.join(path, "config.json")
    model_config_from_hf(hf, where)
    if cfg is not None:
        check_model_config(cfg, hf, where)
    st = SafetensorsDir(path)
    for name, shape in expected_hf_shapes(hf).items():
        if name not in st:
            raise InteropError(f"{path}: tensor {name!r} missing")
        if st.shape(name) != shape:
            raise InteropError(f"{path}: tensor {name!r} has shape {list(st.shape(name))}, "
                               f"expected {list(shape)} from config.json")
    if cfg is not None and cfg.model.init_new_rows == "keep":
        V = hf["vocab_size"]
        if cfg.padded_vocab_size() < V:
            raise InteropError(f"model.init_new_rows=keep: the model's padded vocabulary ({cfg.padded_vocab_size()}) "
                               f"is smaller than the text vocabulary vocab_size={V} of {where}")
    return hf, st


# ------------------------------------------------------------------------------------------------
# tensor mapping
# ------------------------------------------------------------------------------------------------
def qkv_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q/k/v (rows = heads x head_dim) -> megatron's fused rows [g0: q.., k, v | g1: ...]."""
    rest = q.shape[1:]
    qg = q.reshape(groups, -1, *rest)
    kg = k.reshape(groups, -1, *rest)
    vg = v.reshape(groups, -1, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest).contiguous()


def qkv_from_megatron(qkv: torch.Tensor, heads: int, groups: int, head_dim: int):
    rest = qkv.shape[1:]
    per = heads // groups
    x = qkv.reshape(groups, (per + 2) * head_dim, *rest)
    q, k, v = x.split([per * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(heads * head_dim, *rest).contiguous(), k.reshape(groups * head_dim, *rest).contiguous(),
            v.reshape(groups * head_dim, *rest).contiguous())


_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


def new_vocab_rows(text: Optional[torch.Tensor], rows: int, cfg, canonical: str) -> torch.Tensor:
    """The unit-vocabulary matrix [rows, hidden] from a text matrix per ``model.init_new_rows``."""
    from megaslm.model import _param_seed

    mode, std, h = cfg.model.init_new_rows, cfg.model.init_method_std, cfg.model.hidden_size
    g = torch.Generator().manual_seed(_param_seed(cfg.seed, canonical + ":new-rows"))
    noise = torch.randn((rows, h), generator=g, dtype=torch.float32)
    if mode == "normal":
        return noise * std
    if mode == "mean":
        return text.mean(dim=0, keepdim=True) + noise * (0.1 * std)
    if mode == "keep":
        out = noise * std
        n = min(rows, text.shape[0])
        out[:n] = text[:n]
        return out
    raise InteropError(f"model.init_new_rows: expected one of {', '.join(INIT_MODES)}, got {mode!r}")


def canonical_from_hf(st: SafetensorsDir, hf: Dict[str, Any], cfg, canonical: str) -> Optional[torch.Tensor]:
    """The full (TP=1) fp32 value of one canonical parameter; None for parameters HF has no source for."""
    mc = model_config_from_hf(hf)
    if canonical == EMB or canonical == OUT:
        need_text = cfg.model.init_new_rows in ("mean", "keep")
        src = "model.embed_tokens.weight"
        if canonical == OUT and not mc["tie_embeddings"]:
            src = "lm_head.weight"
        text = st.get(src) if need_text else None
        return new_vocab_rows(text, cfg.padded_vocab_size(), cfg, canonical)
    if canonical == "decoder.final_layernorm.weight":
        return st.get("model.norm.weight")
    if not canonical.startswith("decoder.layers."):
        return None  # e.g. embedding.word_embeddings.lang_weight: no text-LM counterpart, keeps its init
    _, _, idx, rest = canonical.split(".", 3)
    p = f"model.layers.{idx}."
    if rest in _LAYER_MAP:
        return st.get(p + _LAYER_MAP[rest])
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([st.get(p + "mlp.gate_proj.weight"), st.get(p + "mlp.up_proj.weight")], dim=0)
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = (st.get(p + f"self_attn.{x}_proj.{kind}") for x in "qkv")
        return qkv_to_megatron(q, k, v, mc["num_query_groups"])
    raise InteropError(f"{canonical}: no Hugging Face source tensor known for this parameter")


@torch.no_grad()
def load_hf_into_chunks(chunks, cfg, path: str) -> None:
    """Fill this rank's shards (any TP/PP/VPP layout) from an HF Llama/Qwen2 directory."""
    hf, st = open_hf_dir(path, cfg)
    cache: Dict[str, torch.Tensor] = {}
    for _, param, spec in sharding.iter_params(chunks, cfg):
        if spec.canonical not in cache:
            full = canonical_from_hf(st, hf, cfg, spec.canonical)
            if full is None:
                continue
            cache[spec.canonical] = full
        full = cache[spec.canonical]
        if tuple(full.shape) != spec.full_shape:
            raise InteropError(f"{spec.canonical}: built {list(full.shape)} from {path}, "
                               f"but the model expects {list(spec.full_shape)}")
        param.copy_(spec.shard(full).to(param.dtype))


def apply_init_from(chunks, cfg, engine=None) -> None:
    """The step after ``build_model`` that starts a run from ``cfg.model.init_from`` (TWIST): HF weights
    into this rank's shards and, when a DeepSpeed engine already holds fp32 master copies (ZeRO-1/2,
    bf16), into those too."""
    if not cfg.model.init_from:
        return
    load_hf_into_chunks(chunks, cfg, cfg.model.init_from)
    if engine is not None:
        from megaslm.checkpoint.engine import sync_master_weights

        sync_master_weights(engine, chunks)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
def export_architecture(cfg, arch: Optional[str] = None) -> str:
    """Qwen2ForCausalLM for a QKV-bias model, LlamaForCausalLM otherwise (or as asked, when it fits)."""
    if cfg.model.language_embedding:
        raise InteropError("model.language_embedding=true: HF Llama/Qwen2 have no per-token language embedding, "
                           "so the exported model would compute another function; export is refused")
    arch = arch or ("Qwen2ForCausalLM" if cfg.model.add_qkv_bias else "LlamaForCausalLM")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InteropError(f"--arch {arch}: unsupported architecture (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if arch == "LlamaForCausalLM" and cfg.model.add_qkv_bias:
        raise InteropError("model.add_qkv_bias=true: LlamaForCausalLM cannot hold QKV biases (export as Qwen2ForCausalLM)")
    if arch == "Qwen2ForCausalLM" and not cfg.model.add_qkv_bias:
        raise InteropError("model.add_qkv_bias=false: Qwen2ForCausalLM always has QKV biases (export as LlamaForCausalLM)")
    return arch


def hf_state_dict_from_canonical(full: Dict[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
    m = cfg.model
    out: Dict[str, torch.Tensor] = {}

    def get(name):
        if name not in full:
            raise InteropError(f"checkpoint: tensor {name!r} missing")
        return full[name]

    out["model.embed_tokens.weight"] = get(EMB)
    out["model.norm.weight"] = get("decoder.final_layernorm.weight")
    if not m.tie_embeddings:
        out["lm_head.weight"] = get(OUT)
    for i in range(m.num_layers):
        c, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        for ours, theirs in _LAYER_MAP.items():
            out[p + theirs] = get(c + ours)
        gate, up = get(c + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        kinds = ("weight", "bias") if m.add_qkv_bias else ("weight",)
        for kind in kinds:
            q, k, v = qkv_from_megatron(get(c + f"self_attention.linear_qkv.{kind}"), m.num_attention_heads,
                                        m.num_query_groups, cfg.head_dim)
            out[p + f"self_attn.q_proj.{kind}"], out[p + f"self_attn.k_proj.{kind}"], out[p + f"self_attn.v_proj.{kind}"] = q, k, v
    return {k: v.contiguous() for k, v in out.items()}


def hf_config_from_run(cfg, arch: str, dtype: torch.dtype = torch.float32) -> Dict[str, Any]:
    """config.json for the exported model: the padded unit vocabulary (vocab_size = padded size, so
    the logits equal ours; ids >= vocab.size are padding rows the data never uses), special ids from
    megaslm.vocab (bos=1, eos=eod=2, pad=0), and the unit vocabulary itself under ``megaslm_vocab``."""
    m, v = cfg.model, cfg.vocab
    d = {
        "architectures": [arch],
        "model_type": SUPPORTED_ARCHITECTURES[arch],
        "vocab_size": cfg.padded_vocab_size(),
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings or m.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": m.init_method_std,
        "bos_token_id": v.bos_id,
        "eos_token_id": v.eod_id,
        "pad_token_id": v.pad_id,
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "megaslm_vocab": v.to_dict(),
    }
    if m.rope_scaling:
        d["rope_scaling"] = {"rope_type": "llama3", "factor": m.rope_scaling_factor, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if arch == "LlamaForCausalLM":
        d.update(attention_bias=False, mlp_bias=False)
    else:
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
    return d


def save_hf(full: Dict[str, torch.Tensor], cfg, out_dir: str, arch: Optional[str] = None,
            dtype: Optional[torch.dtype] = None, facts: Optional[Dict[str, Any]] = None) -> str:
    """Write an HF directory: model.safetensors, config.json, generation_config.json, the unit tokenizer
    (hf_extras) and README.md, the model card (hf_card; ``facts`` from ``hf_card.run_facts``, else every
    run fact is stated unknown). Each file is written atomically."""
    clash = kernels_name_clash()
    if clash:   # transformers' own import would fail naming neither package (megaslm/deps.py)
        raise InteropError(clash)
    import transformers   # imported here, not at module load: it costs seconds and only export needs it
    from safetensors.torch import save_file

    from megaslm.interop import hf_card, hf_extras

    arch = export_architecture(cfg, arch)
    facts = facts if facts is not None else hf_card.run_facts(None, {}, cfg)
    sd = hf_state_dict_from_canonical(full, cfg)
    dtype = dtype or next(iter(sd.values())).dtype
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    os.makedirs(out_dir, exist_ok=True)
    with atomic_path(os.path.join(out_dir, "model.safetensors")) as tmp:
        save_file(sd, tmp, metadata={"format": "pt"})
    conf = hf_config_from_run(cfg, arch, dtype)
    # the installed transformers writes config.json in its own format (e.g. rope_parameters in v5)
    cls = getattr(transformers, {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}[conf["model_type"]])
    with hf_extras.staged(out_dir) as tmp:
        cls(**{k: v for k, v in conf.items() if k not in ("model_type", "torch_dtype")}).save_pretrained(tmp)
        hf_extras.commit_staged(tmp, out_dir)
    padded, max_len = cfg.padded_vocab_size(), conf["max_position_embeddings"]
    hf_extras.save_generation_config(cfg.vocab, padded, out_dir)
    if facts.get("bpe"):   # BPE piece ids have no one-unit spelling: the card says so instead
        hf_extras.remove_tokenizer(out_dir)
    else:
        hf_extras.save_tokenizer(cfg.vocab, padded, max_len, out_dir)
    card = hf_card.model_card(cfg, arch, str(dtype).replace("torch.", ""), facts)
    atomic_write_text(os.path.join(out_dir, "README.md"), card)
    return out_dir


def export_hf(checkpoint: str, out_dir: str, arch: Optional[str] = None,
              dtype: Optional[torch.dtype] = None, config=None) -> str:
    """Checkpoint (any layout, read by ``megaslm.checkpoint.reader``) -> HF directory loadable by
    AutoModelForCausalLM / AutoTokenizer.from_pretrained offline, with a model card from the run's records."""
    from megaslm.checkpoint.layout import resolve_tag_dir
    from megaslm.checkpoint.reader import read_checkpoint
    from megaslm.interop.hf_card import run_facts

    cfg, full, meta = read_checkpoint(checkpoint, config)
    facts = run_facts(resolve_tag_dir(checkpoint), meta, cfg)
    return save_hf(full, cfg, out_dir, arch=arch, dtype=dtype, facts=facts)
