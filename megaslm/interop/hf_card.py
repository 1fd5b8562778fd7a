"""The model card (``README.md``) of a Hugging Face export: what the units are, the network, the data and
tokens per stage, the evaluation results, all from what the run recorded, torch-free.

Sources: the run config (``vocab``, ``model``, ``schedule.stages``), the checkpoint's ``meta.json``
(step, tokens seen, tokens per stage and per dataset, config digest), each training dataset's
``<prefix>.manifest.json`` (data_tools build: tokens, hours, mode, source and frame rate, content hash,
BPE), and the run directory's ``evals/results.json`` (``launchers/eval.py``), ``evals/results.jsonl``
(evaluation during training) and the ``valid_loss`` records of ``metrics.jsonl``. A fact none of them
records is written as unknown, never guessed.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from megaslm.vocab import VocabError, read_manifest

UNKNOWN = "unknown"


# ------------------------------------------------------------------------------------------------
# facts
# ------------------------------------------------------------------------------------------------
def parse_unit_source(unit_source: str) -> Dict[str, str]:
    """``"mimi:checkpoint=1a2b:codebook_size=2048:frame_rate=12.5"`` -> {"tokenizer": "mimi", "checkpoint": ...}
    (data_tools/audio/tokenizers.py: ``UnitTokenizer.unit_source``); {} when nothing is recorded."""
    if not unit_source:
        return {}
    head, *rest = unit_source.split(":")
    out = {"tokenizer": head}
    for part in rest:
        k, _, v = part.partition("=")
        out[k] = v
    return out


def _read_jsonl(path: str) -> List[Dict[str, Any]]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue   # a line cut by a killed writer: the others still count
                if isinstance(rec, dict):
                    out.append(rec)
    return out


def eval_results(run_dir: str, step: Optional[int]) -> List[Dict[str, Any]]:
    """Evaluation records of checkpoint ``step`` found in the run directory, each with its ``source`` file."""
    found: List[Dict[str, Any]] = []
    rj = os.path.join(run_dir, "evals", "results.json")
    if os.path.isfile(rj):
        try:
            with open(rj) as f:
                recs = json.load(f).get("checkpoints", [])
        except (OSError, ValueError, AttributeError):
            recs = []
        found += [dict(r, source=rj) for r in recs if isinstance(r, dict) and r.get("step") == step]
    path = os.path.join(run_dir, "evals", "results.jsonl")      # evaluation during training (evals/hooks.py)
    if os.path.isfile(path):
        found += [dict(r, source=path) for r in _read_jsonl(path) if r.get("step") == step]
    path = os.path.join(run_dir, "metrics.jsonl")                # the held-out loss (eval.valid)
    if os.path.isfile(path):
        found += [{"step": step, "valid_loss": r["valid_loss"], "source": path} for r in _read_jsonl(path)
                  if r.get("step") == step and "valid_loss" in r]
    return found


def _manifest(prefix: str) -> Dict[str, Any]:
    try:
        return read_manifest(prefix)
    except (VocabError, OSError) as e:
        return {"_error": str(e)}


def run_facts(tag_dir: Optional[str], meta: Dict[str, Any], cfg) -> Dict[str, Any]:
    """Everything the card states, gathered from the checkpoint ``tag_dir`` and its run directory."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(tag_dir))) if tag_dir else None
    step = meta.get("step")
    stage_tokens, source_tokens = meta.get("stage_tokens") or {}, meta.get("source_tokens") or {}
    budgets = meta.get("stage_budgets") or {}
    stages = []
    for st, steps in zip(cfg.schedule.stages, cfg.stage_steps()):
        trained = stage_tokens.get(st.name, 0 if step == 0 else None)
        data = [{"path": src.path, "weight": src.weight, "manifest": _manifest(src.path),
                 "tokens": (source_tokens.get(st.name) or {}).get(src.path, 0 if step == 0 else None)}
                for src in st.data]
        planned = budgets.get(st.name, st.train_tokens or steps * cfg.tokens_per_step)   # data.stage_plans' rule
        stages.append({"name": st.name, "train_steps": st.train_steps, "train_tokens": st.train_tokens,
                       "budget": planned, "tokens": trained, "data": data})
    bpe = [d["manifest"]["bpe"] for s in stages for d in s["data"] if d["manifest"].get("bpe")]
    return {"tag_dir": tag_dir, "run_dir": run_dir, "step": step, "tokens_seen": meta.get("tokens_seen"),
            "config_digest": meta.get("config_digest"), "stages": stages, "bpe": bpe[0] if bpe else None,
            "evals": eval_results(run_dir, step) if run_dir else []}


# ------------------------------------------------------------------------------------------------
# the card
# ------------------------------------------------------------------------------------------------
def _v(x, fmt="{}") -> str:
    return UNKNOWN if x is None or x == "" else fmt.format(x)


def _int(x) -> str:
    return _v(x, "{:,}")


def _frame_rate(vocab, facts) -> str:
    src = parse_unit_source(vocab.unit_source)
    if src.get("frame_rate"):
        return f"{src['frame_rate']} units/s (recorded by the tokeniser)"
    rates = {(d["manifest"].get("source") or {}).get("frame_rate") for s in facts["stages"] for d in s["data"]}
    rates.discard(None)
    if len(rates) == 1:
        return (f"{rates.pop()} units/s as given to the dataset build (data_tools --source-type/--frame-rate; "
                f"no tokeniser recorded it)")
    return UNKNOWN


def units_section(cfg, facts) -> List[str]:
    v = cfg.vocab
    src = parse_unit_source(v.unit_source)
    layout = "0 pad, 1 bos, 2 eod"
    if v.lang_tags:
        layout += ", " + ", ".join(f"{v.lang_tag_id(l)} <lang_{l}>" for l in v.languages)
    if v.sentence_sep:
        layout += f", {v.sep_id} <sep>"
    rows = [("unit tokeniser", src.get("tokenizer")), ("tokeniser checkpoint hash", src.get("checkpoint")),
            ("layer", src.get("layer")), ("k-means codebook hash", src.get("kmeans")),
            ("codebook size", v.codebook_size), ("frame rate", _frame_rate(v, facts)),
            ("unit_source (as recorded)", v.unit_source or None),
            ("token ids", f"{layout}; unit u = id {v.offset} + u (offset {v.offset}); {v.size} ids "
                          f"(padded to {cfg.padded_vocab_size()})"),
            ("languages", ", ".join(v.languages)), ("consecutive repeats removed (dedup)", v.dedup)]
    if facts.get("bpe"):
        b = facts["bpe"]
        rows.append(("unit BPE", f"ids are BPE pieces ({b.get('pieces')}) of the sentencepiece model "
                                 f"{b.get('model')}, over {b.get('unit_codebook_size')} units"))
    out = ["## Units", "", "| | |", "|---|---|"]
    out += [f"| {k} | {_v(val)} |" for k, val in rows if not (k in ("layer", "k-means codebook hash") and val is None)]
    return out + [""]


def architecture_section(cfg, arch: str, dtype: str) -> List[str]:
    m = cfg.model
    rope = f"theta {m.rotary_base}" + (f", Llama-3 scaling x{m.rope_scaling_factor}" if m.rope_scaling else "")
    rows = [("architecture", arch), ("parameters", f"{cfg.num_parameters():,}"), ("layers", m.num_layers),
            ("hidden size", m.hidden_size), ("FFN size (SwiGLU)", m.ffn_hidden_size),
            ("attention heads / KV heads / head dim",
             f"{m.num_attention_heads} / {m.num_query_groups} / {cfg.head_dim}"),
            ("RoPE", rope), ("RMSNorm epsilon", m.norm_epsilon), ("QKV bias", m.add_qkv_bias),
            ("tied embeddings", m.tie_embeddings), ("training context", m.seq_length),
            ("max positions", m.max_position_embeddings or m.seq_length), ("weights dtype", dtype)]
    return ["## Architecture", "", "| | |", "|---|---|"] + [f"| {k} | {val} |" for k, val in rows] + [""]


def _dataset_line(d: Dict[str, Any]) -> str:
    man = d["manifest"]
    head = f"  - `{d['path']}` (weight {d['weight']}): {_int(d['tokens'])} tokens trained"
    if "_error" in man:
        return head + f"; manifest: {UNKNOWN} ({man['_error']})"
    hours = man.get("hours") or {}
    parts = [f"{_int((man.get('tokens') or {}).get('total'))} tokens in the dataset",
             "hours " + (", ".join(f"{k} {h:.2f}" for k, h in hours.items()) if hours else UNKNOWN),
             f"mode {_v(man.get('mode'))}" + (f" (p={man['p']})" if man.get("p") is not None else ""),
             f"bos {'added' if man.get('add_bos') else 'not added'}",
             f"content hash {_v(man.get('content_hash_algorithm'))} {_v(man.get('content_hash'))}"]
    return head + "; " + "; ".join(parts)


def data_section(facts) -> List[str]:
    out = ["## Training data and tokens per stage", "",
           f"Checkpoint `{_v(facts.get('tag_dir'))}`: step {_v(facts.get('step'))}, "
           f"{_int(facts.get('tokens_seen'))} tokens seen in all, config digest {_v(facts.get('config_digest'))}.", ""]
    if not facts["stages"]:
        return out + [f"Stages: {UNKNOWN}.", ""]
    out += ["| stage | tokens trained | planned |", "|---|---:|---|"]
    for s in facts["stages"]:
        planned = f"{s['budget']:,} tokens" + (f" ({s['train_steps']} steps)" if s["train_steps"] is not None else "")
        out.append(f"| {s['name']} | {_int(s['tokens'])} | {planned} |")
    out.append("")
    for s in facts["stages"]:
        out.append(f"- stage `{s['name']}`:" + ("" if s["data"] else f" datasets {UNKNOWN} (none in the config)"))
        out += [_dataset_line(d) for d in s["data"]]
    return out + [""]


def _eval_line(r: Dict[str, Any]) -> str:
    if "valid_loss" in r and "tasks" not in r:
        return f"- held-out loss (valid_loss) {r['valid_loss']:.4f} (`{r['source']}`)"
    tasks = ", ".join(f"{k} {t['accuracy'] * 100:.2f}%" for k, t in sorted((r.get("tasks") or {}).items()))
    align = ", ".join(f"{k} cosine {a['cosine']:.3f}" for k, a in sorted((r.get("alignment") or {}).items()))
    body = "; ".join(x for x in (tasks, align) if x) or "no task results"
    return f"- {body} (scoring {_v(r.get('scoring'))}; `{r['source']}`)"


def eval_section(facts) -> List[str]:
    out = ["## Evaluation", ""]
    if not facts["evals"]:
        where = os.path.join(facts["run_dir"], "evals") if facts.get("run_dir") else "the run directory"
        return out + [f"Results for this checkpoint: {UNKNOWN} (none recorded in {where} or metrics.jsonl).", ""]
    return out + [_eval_line(r) for r in facts["evals"]] + [""]


def usage_section(cfg, facts) -> List[str]:
    if facts.get("bpe"):
        return ["## Use", "", f"No tokenizer is exported: the ids are BPE pieces over units (sentencepiece model "
                f"`{facts['bpe'].get('model')}`, data_tools/bpe.py), which a word-level unit tokenizer cannot spell. "
                f"Token id = {cfg.vocab.offset} + piece id.", ""]
    return ["## Use", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "tok = AutoTokenizer.from_pretrained(path)",
            "model = AutoModelForCausalLM.from_pretrained(path)",
            'ids = tok("<Un5><Un17><Un17><Un42>", return_tensors="pt").input_ids',
            "out = model.generate(ids, max_new_tokens=32, do_sample=False)",
            'units = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)   # "<Un..><Un..>..."',
            "```", "",
            "Each token is one unit `<UnN>` (or a special); decoded strings are data_tools `audio_repr` values. "
            "No bos is added on encode. generation_config.json ends at eod and suppresses the ids the "
            "unit sampler never draws (pad, bos, tags, padding rows).", ""]


def model_card(cfg, arch: str, dtype: str, facts: Dict[str, Any]) -> str:
    """README.md of the export folder."""
    v = cfg.vocab
    head = [f"# {cfg.name}: spoken language model over discrete speech units", "",
            f"A decoder-only language model over {v.codebook_size} discrete speech units "
            f"({', '.join(v.languages)}), trained with megaslm and exported as `{arch}`. It reads and "
            f"writes unit ids, not text.", ""]
    lines = head + usage_section(cfg, facts) + units_section(cfg, facts) + architecture_section(cfg, arch, dtype)
    return "\n".join(lines + data_section(facts) + eval_section(facts))
