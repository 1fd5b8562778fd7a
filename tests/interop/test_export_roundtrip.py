"""A complete Hugging Face export: transformers' AutoTokenizer + AutoModelForCausalLM continue a unit prompt
greedily with exactly the units evals.generate.sample (launchers/sample.py) gives, the decoded string parses
back through data_tools; generation config, model card and atomic writes."""
import json
import os

import pytest
import torch

from megaslm.interop import hf_card, hf_extras
from megaslm.interop.hf import config_overrides_from_hf, export_hf, read_hf_config, save_hf
from tests.distributed import run_ranks

PROMPT = [5, 17, 17, 42, 99, 3]
MAX_NEW = 24


@pytest.fixture(scope="module")
def exported(llama_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("export")
    # vocabulary kept (3 specials + 125 units = the HF vocab of 128): the random text rows make well-separated
    # logits, so greedy decoding is not decided by rounding between two implementations
    overrides = config_overrides_from_hf(read_hf_config(llama_dir)) + [
        f"model.init_from={llama_dir}", "model.init_new_rows=keep", "vocab.codebook_size=125",
        "model.make_vocab_size_divisible_by=64", "model.seq_length=32"]
    res = run_ranks(1, "interop_workers:import_and_sample", overrides, str(work / "run"), PROMPT, MAX_NEW)[0]
    res["hf"] = export_hf(res["checkpoint"], str(work / "hf"))
    return res


def test_generate_decode_parse_equals_sample(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_tools.formats import audio_repr_units

    tok = AutoTokenizer.from_pretrained(exported["hf"])
    model = AutoModelForCausalLM.from_pretrained(exported["hf"], dtype=torch.float32).eval()
    ids = tok("".join(f"<Un{u}>" for u in PROMPT), return_tensors="pt").input_ids
    assert ids[0].tolist() == [3 + u for u in PROMPT]          # offset 3, no bos added
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    units = audio_repr_units(text, 125, "generated", 1).tolist() if text else []
    print(f"sample: {exported['units']}\nHF:     {units}")
    assert units == exported["units"] and len(units) > 0


def test_files_generation_config_and_card(exported):
    d = exported["hf"]
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= set(os.listdir(d))
    assert not [n for n in os.listdir(d) if ".tmp-" in n or n.startswith(".staging-")]
    gen = json.load(open(os.path.join(d, "generation_config.json")))
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["bos_token_id"]) == (2, 0, 1)   # eos = eod
    assert gen["suppress_tokens"] == [0, 1]          # 128 ids, no padding rows: only pad and bos are never drawn
    card = open(os.path.join(d, "README.md")).read()
    assert "| codebook size | 125 |" in card and "| main | 0 |" in card     # step 0: no token trained yet
    assert "LlamaForCausalLM" in card and "unit tokeniser | unknown" in card


def test_tokenizer_id_order_with_tags_separator_and_padding(tmp_path):
    from transformers import AutoTokenizer

    from megaslm.vocab import UnitVocab

    v = UnitVocab(codebook_size=10, languages=("en", "fr"), lang_tags=True, sentence_sep=True)
    names = hf_extras.save_tokenizer(v, 24, 64, str(tmp_path))
    assert "tokenizer.json" in names and not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 24 and tok.convert_ids_to_tokens(list(range(7))) == \
        ["<pad>", "<bos>", "<eod>", "<lang_en>", "<lang_fr>", "<sep>", "<Un0>"]
    ids = tok("<lang_fr><Un3><Un9> <sep><Un0><eod>").input_ids
    assert ids == [v.lang_tag_id("fr"), v.offset + 3, v.offset + 9, v.sep_id, v.offset, v.eod_id]
    assert tok.decode(ids, skip_special_tokens=True) == "<Un3><Un9><Un0>"
    assert tok.convert_ids_to_tokens(23) == "<unused_7>"
    assert hf_extras.suppressed_ids(v, 24) == [0, 1, 3, 4, 5] + list(range(16, 24))


def _run_dir(tmp_path, with_records: bool):
    from megaslm.config_io import load_config
    from megaslm.vocab import UnitVocab

    prefix = str(tmp_path / "data" / "en_fr")
    vocab = UnitVocab(codebook_size=2048, unit_source="mimi:checkpoint=1a2b3c4d:codebook_size=2048:frame_rate=12.5")
    cfg = load_config(None, ["vocab.codebook_size=2048", f"vocab.unit_source={vocab.unit_source}",
                             'schedule.stages.0.data=[{"path": "%s"}]' % prefix, "schedule.stages.0.name=pretrain",
                             "schedule.stages.0.train_tokens=4096"])
    tag = tmp_path / "run" / "checkpoints" / "step00000003"
    tag.mkdir(parents=True)
    if not with_records:
        return cfg, str(tag)
    os.makedirs(os.path.dirname(prefix))
    json.dump({"vocab": vocab.to_dict(), "tokens": {"total": 9000}, "hours": {"en": 0.1, "fr": 0.1}, "mode": "random",
               "p": 0.5, "add_bos": False, "content_hash": "ab12", "content_hash_algorithm": "xxh3_128",
               "source": {"name": "mimi", "frame_rate": 12.5}}, open(prefix + ".manifest.json", "w"))
    (tmp_path / "run" / "evals").mkdir()
    json.dump({"checkpoints": [{"step": 3, "scoring": "mean", "tasks": {"sSC-EN": {"accuracy": 0.625}},
                                "alignment": {}}, {"step": 1, "tasks": {"sSC-EN": {"accuracy": 0.1}}}]},
              open(tmp_path / "run" / "evals" / "results.json", "w"))
    (tmp_path / "run" / "evals" / "results.jsonl").write_text(   # evaluation during training
        json.dumps({"step": 3, "scoring": "mean", "tasks": {"sWUGGY": {"accuracy": 0.75}}, "alignment": {}}) + "\n")
    (tmp_path / "run" / "metrics.jsonl").write_text(
        json.dumps({"step": 2, "loss": 3.0}) + "\n" + json.dumps({"step": 3, "loss": 2.5, "valid_loss": 2.25}) + "\n")
    return cfg, str(tag)


def test_card_states_records_and_unknowns(tmp_path):
    cfg, tag = _run_dir(tmp_path / "a", with_records=True)
    meta = {"step": 3, "tokens_seen": 4096, "stage_tokens": {"pretrain": 4096}, "stage_budgets": {"pretrain": 4096},
            "source_tokens": {"pretrain": {cfg.schedule.stages[0].data[0].path: 4096}}}
    card = hf_card.model_card(cfg, "LlamaForCausalLM", "float32", hf_card.run_facts(tag, meta, cfg))
    for want in ("| codebook size | 2048 |", "| unit tokeniser | mimi |", "| tokeniser checkpoint hash | 1a2b3c4d |",
                 "12.5 units/s (recorded by the tokeniser)", "| pretrain | 4,096 |", "9,000 tokens in the dataset",
                 "sSC-EN 62.50%", "sWUGGY 75.00%", "valid_loss) 2.2500", "offset 3"):
        assert want in card, want
    assert "10.00%" not in card                               # another checkpoint's results are not this one's
    man_path = cfg.schedule.stages[0].data[0].path + ".manifest.json"
    man = json.load(open(man_path))
    json.dump(dict(man, bpe={"model": "/m/units.model", "pieces": 4000}), open(man_path, "w"))
    card = hf_card.model_card(cfg, "LlamaForCausalLM", "float32", hf_card.run_facts(tag, meta, cfg))
    assert "No tokenizer is exported" in card and "BPE pieces (4000)" in card
    cfg, tag = _run_dir(tmp_path / "b", with_records=False)
    card = hf_card.model_card(cfg, "LlamaForCausalLM", "float32", hf_card.run_facts(tag, {"step": 3}, cfg))
    for want in ("| pretrain | unknown |", "manifest: unknown", "Results for this checkpoint: unknown"):
        assert want in card, want


def test_interrupted_export_leaves_no_partial_file(exported, tmp_path, monkeypatch):
    from megaslm.checkpoint import read_checkpoint

    cfg, full, _ = read_checkpoint(exported["checkpoint"])

    def killed(*a, **k):
        raise KeyboardInterrupt

    import transformers

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", killed)   # killed mid-export
    with pytest.raises(KeyboardInterrupt):
        save_hf(full, cfg, str(tmp_path / "hf"))
    left = sorted(os.listdir(tmp_path / "hf"))
    assert left == ["config.json", "generation_config.json", "model.safetensors"], left
