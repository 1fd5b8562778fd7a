"""The parts of a Hugging Face export besides the weights: tokenizer, generation config, atomic staging.

Tokenizer (``AutoTokenizer.from_pretrained(out_dir)``): one token per id of the exported model, in the
model's id order (``megaslm.vocab``)::

    0 <pad>   1 <bos>   2 <eod>   [<lang_en> <lang_fr> ...]   [<sep>]   <Un0> .. <Un{K-1}>   [<unused_0> ..]

Units are spelled ``<UnN>``, the unit strings data_tools reads (slamkit's ``audio_repr``, data_tools/formats.py),
so ``tokenizer.decode(ids, skip_special_tokens=True)`` is ``"<Un12><Un907>..."``, a valid ``audio_repr``
value. The ``<unused_i>`` tokens name the padding rows (ids >= ``vocab.size``) that the exported
``vocab_size`` carries for tensor parallelism; the model never learnt to produce them. Built with the
``tokenizers`` library: a WordLevel model, a pre-tokenizer that splits on whitespace and isolates each
``<...>`` token (so both ``"<Un1><Un2>"`` and ``"<Un1> <Un2>"`` encode), a Fuse decoder (tokens
concatenated, as in ``audio_repr``), the non-unit tokens as special added tokens. No bos is added on
encode (the training data has none unless the dataset manifest says ``add_bos``). Text outside the
vocabulary is an error (there is no ``<unk>`` id in the model).

generation_config.json: eos = eod, pad, bos, and ``suppress_tokens`` = every id ``launchers/sample.py``
never draws (pad, bos, language tags, separator, padding rows), so ``model.generate`` samples from the
same support as ``evals.generate.sample`` and greedy decoding gives the same units.

Every file goes through ``megaslm.fsutil.atomic_path``: writers that only write into a directory
(``save_pretrained``) write into a staging folder inside the export folder, whose files are then
renamed over their final names one by one (``commit_staged``).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Dict, Iterator, List

from megaslm.fsutil import atomic_path, atomic_write_json
from megaslm.vocab import UnitVocab

UNIT_TOKEN = "<Un{}>"       # data_tools/formats.py: _UNIT_TOKEN = r"<Un(\d+)>"
PAD, BOS, EOD, SEP = "<pad>", "<bos>", "<eod>", "<sep>"
LANG_TOKEN = "<lang_{}>"
UNUSED_TOKEN = "<unused_{}>"


def token_strings(vocab: UnitVocab, padded_size: int) -> List[str]:
    """The token of every id 0 .. padded_size - 1, in the model's id order."""
    out = [PAD, BOS, EOD]
    if vocab.lang_tags:
        out += [LANG_TOKEN.format(lang) for lang in vocab.languages]
    if vocab.sentence_sep:
        out.append(SEP)
    assert len(out) == vocab.offset, (out, vocab.offset)
    out += [UNIT_TOKEN.format(u) for u in range(vocab.codebook_size)]
    out += [UNUSED_TOKEN.format(i) for i in range(padded_size - vocab.size)]
    return out


def suppressed_ids(vocab: UnitVocab, padded_size: int) -> List[int]:
    """Ids ``evals.generate.sample`` never draws: every id but the units and eod."""
    return [i for i in range(vocab.offset) if i != vocab.eod_id] + list(range(vocab.size, padded_size))


def generation_config(vocab: UnitVocab, padded_size: int) -> Dict:
    return {"bos_token_id": vocab.bos_id, "eos_token_id": vocab.eod_id, "pad_token_id": vocab.pad_id,
            "suppress_tokens": suppressed_ids(vocab, padded_size)}


def build_tokenizer(vocab: UnitVocab, padded_size: int, max_length: int):
    """A ``PreTrainedTokenizerFast`` for the unit vocabulary (module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = token_strings(vocab, padded_size)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"<[^<>\s]*>"), behavior="isolated")])
    tok.decoder = decoders.Fuse()
    units = range(vocab.offset, vocab.size)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for i, t in enumerate(tokens) if i not in units])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOD,
                                   clean_up_tokenization_spaces=False, model_max_length=max_length)


@contextlib.contextmanager
def staged(out_dir: str) -> Iterator[str]:
    """A fresh folder inside ``out_dir`` for writers that only write whole directories; removed at the end."""
    tmp = tempfile.mkdtemp(prefix=".staging-", dir=out_dir)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit_staged(staging: str, out_dir: str) -> List[str]:
    """Move every file of ``staging`` over its name in ``out_dir``, each through ``atomic_path``."""
    names = sorted(n for n in os.listdir(staging) if os.path.isfile(os.path.join(staging, n)))
    for name in names:
        with atomic_path(os.path.join(out_dir, name)) as tmp:
            os.replace(os.path.join(staging, name), tmp)
    return names


def save_tokenizer(vocab: UnitVocab, padded_size: int, max_length: int, out_dir: str) -> List[str]:
    """Write the tokenizer files into ``out_dir`` (atomically, file by file); returns their names."""
    tok = build_tokenizer(vocab, padded_size, max_length)
    with staged(out_dir) as tmp:
        tok.save_pretrained(tmp)
        # Hand-edited on purpose: transformers 5 records its backend class name (TokenizersBackend), which
        # transformers 4 (setup.py allows >= 4.45) cannot resolve; PreTrainedTokenizerFast loads in both.
        conf_path = os.path.join(tmp, "tokenizer_config.json")
        with open(conf_path) as f:
            conf = json.load(f)
        conf["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(conf_path, "w") as f:
            json.dump(conf, f, indent=2)
        return commit_staged(tmp, out_dir)


def remove_tokenizer(out_dir: str) -> None:
    """No tokenizer for this export: the files an earlier export into ``out_dir`` left would not fit it."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))


def save_generation_config(vocab: UnitVocab, padded_size: int, out_dir: str) -> None:
    atomic_write_json(os.path.join(out_dir, "generation_config.json"), generation_config(vocab, padded_size),
                      indent=2)
