"""Unit BPE with sentencepiece: unit u <-> the character chr(0x4E00 + u); pieces become token ids.

Token id of a piece = vocab.offset + piece id (piece 0 is sentencepiece's <unk>, never produced:
every codebook character is put in the training text, so all single units are pieces).
Decoding a piece gives back its characters, hence exactly the units.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Dict, Iterable, List, Sequence

import numpy as np

from data_tools.common import (commit_dataset, commit_files, dedup_units, new_builder, staging_dir, token_dtype,
                               write_error, writing)
from data_tools.errors import DataError
from data_tools.formats import InputSpec, check_inputs, iter_items, parse_item

CHAR_BASE = 0x4E00
MAX_CODEBOOK = 0x9FFF - CHAR_BASE + 1    # 20992 code points in the CJK unified block

_CACHE: Dict[str, "UnitBPE"] = {}


def units_to_text(units: Iterable[int]) -> str:
    return "".join(chr(CHAR_BASE + int(u)) for u in units)


def text_to_units(text: str) -> List[int]:
    return [ord(c) - CHAR_BASE for c in text]


class UnitBPE:
    def __init__(self, model_path: str):
        import sentencepiece as spm
        self.path = model_path
        self.char_base = CHAR_BASE
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.size = self.sp.get_piece_size()
        self._pieces: List[np.ndarray] = []
        for i in range(self.size):
            if self.sp.is_unknown(i) or self.sp.is_control(i):
                self._pieces.append(np.zeros(0, dtype=np.int64))
            else:
                self._pieces.append(np.array(text_to_units(self.sp.id_to_piece(i)), dtype=np.int64))

    @classmethod
    def load(cls, model_path: str) -> "UnitBPE":
        key = os.path.abspath(model_path)
        if key not in _CACHE:
            if not os.path.isfile(model_path):
                raise DataError("BPE model not found", path=model_path)
            _CACHE[key] = cls(model_path)
        return _CACHE[key]

    def encode(self, units: Sequence[int]) -> np.ndarray:
        """Units -> piece ids (0-based; add the vocabulary offset for token ids)."""
        ids = np.asarray(self.sp.encode(units_to_text(units), out_type=int), dtype=np.int64)
        if ids.size and (ids == self.sp.unk_id()).any():
            raise DataError(f"a unit is not in the BPE model {self.path} (codebook larger than at training?)",
                            field="units")
        return ids

    def decode(self, piece_ids: Sequence[int]) -> np.ndarray:
        """Piece ids -> the exact unit sequence."""
        parts = [self._pieces[int(i)] for i in piece_ids]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def decode_tokens(token_ids: Sequence[int], offset: int, model_path: str) -> np.ndarray:
    """Dataset token ids -> units (special tokens dropped)."""
    bpe = UnitBPE.load(model_path)
    t = np.asarray(token_ids, dtype=np.int64)
    t = t[(t >= offset) & (t < offset + bpe.size)] - offset
    return bpe.decode(t)


def train_bpe(unit_sequences: Iterable[Sequence[int]], model_prefix: str, vocab_size: int,
              codebook_size: int, max_sentences: int = 2_000_000, seed: int = 0) -> str:
    """Train a BPE model over unit sequences (a stream); returns ``<model_prefix>.model``."""
    import sentencepiece as spm

    if codebook_size > MAX_CODEBOOK:
        raise DataError(f"unit BPE supports codebooks up to {MAX_CODEBOOK} units, got {codebook_size}")
    if vocab_size <= codebook_size:
        raise DataError(f"--vocab-size must exceed the codebook size ({codebook_size}) + 1, got {vocab_size}")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
        tdir = tempfile.TemporaryDirectory(dir=out_dir)
    except OSError as e:
        raise DataError(f"cannot create the output here ({e.strerror or e}); expected a writable directory for "
                        f"the model prefix", path=model_prefix) from None
    after = "nothing was written at the model prefix"
    with tdir as td:
        txt = os.path.join(td, "units.txt")
        n = 0
        with writing(txt, "the BPE training text", after):
            f = open(txt, "w", encoding="utf-8")
        try:
            for seq in unit_sequences:      # (reading the inputs: their own errors)
                if len(seq):
                    try:
                        f.write(units_to_text(seq) + "\n")
                    except OSError as e:
                        raise write_error(e, txt, "the BPE training text", after) from None
                    n += 1
            with writing(txt, "the BPE training text", after):
                # every unit must be a piece, so that any sequence encodes without <unk>
                for a in range(0, codebook_size, 256):
                    f.write(units_to_text(range(a, min(a + 256, codebook_size))) + "\n")
                f.close()
        finally:
            if not f.closed:
                try:
                    f.close()
                except OSError:
                    pass
        if n == 0:
            raise DataError("no unit sequences to train BPE on")
        if hasattr(spm, "set_random_generator_seed"):
            spm.set_random_generator_seed(int(seed))
        # the model comes back in memory: sentencepiece's own file writes ignore a full disk (a truncated
        # .model and an empty .vocab, no error); these are written here, checked, then renamed into place
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            input=txt, model_writer=model, model_type="bpe", vocab_size=vocab_size,
            character_coverage=1.0, split_by_whitespace=False, split_by_unicode_script=False,
            split_by_number=False, byte_fallback=False, add_dummy_prefix=False,
            remove_extra_whitespaces=False, normalization_rule_name="identity",
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, hard_vocab_limit=False,
            max_sentence_length=1 << 20, input_sentence_size=max_sentences, shuffle_input_sentence=True,
            seed_sentencepiece_size=1_000_000, num_threads=1, minloglevel=2)
        proto = model.getvalue()
        sp = spm.SentencePieceProcessor(model_proto=proto)
        # sentencepiece's .vocab: piece TAB score (C++ ostream float: 6 significant digits, as Python's :g)
        vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
        tmp_prefix = os.path.join(td, "m")
        for path, data in ((tmp_prefix + ".model", proto), (tmp_prefix + ".vocab", vocab.encode("utf-8"))):
            with writing(path, "the BPE model", after):
                with open(path, "wb") as fh:
                    fh.write(data)
        commit_files([(tmp_prefix + ".model", model_prefix + ".model"), (tmp_prefix + ".vocab", model_prefix + ".vocab")],
                     "the BPE model", after)
    _CACHE.pop(os.path.abspath(model_prefix + ".model"), None)
    return model_prefix + ".model"


def iter_training_sequences(inputs, codebook_size: int, languages: Sequence[str],
                            story_langs: Sequence[str], dedup: bool = False):
    """Unit sequences (utterances; every sentence of every language of stories) from input files."""
    specs = [s if isinstance(s, InputSpec) else InputSpec.parse(str(s)) for s in inputs]
    check_inputs(specs)
    for fi, line, text in iter_items(specs):
        rec = parse_item(specs[fi], line, text, codebook_size, languages, story_langs, languages[0])
        seqs = [rec.units] if rec.kind == "utt" else [s for l in story_langs for s in rec.sentences[l]]
        for s in seqs:
            yield dedup_units(s) if dedup else s


def encode_dataset(in_prefix: str, out_prefix: str, model_path: str) -> dict:
    """Re-encode a built (unit-level) dataset with a BPE model into a new dataset + manifest.

    Runs of units of one language between special tokens are encoded separately (pieces never cross
    a language switch, a tag, a separator or a document end).
    """
    from megaslm.vocab import CONTENT_HASH, UnitVocab, hash_files, lang_prefix, manifest_path, read_manifest

    man = read_manifest(in_prefix)
    if man.get("bpe"):
        raise DataError("dataset is already BPE-encoded", path=manifest_path(in_prefix))
    vocab = UnitVocab.from_dict(man["vocab"])
    bpe = UnitBPE.load(model_path)
    # megatron-core (it imports torch: ~7 s of CPU) after the manifest and the model are found
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds, ls = IndexedDataset(in_prefix), IndexedDataset(lang_prefix(in_prefix))
    tok_size = vocab.offset + bpe.size
    dtype = token_dtype(tok_size)
    tmp = staging_dir(out_prefix)
    builders = []
    try:
        f = os.path.join(tmp, "final")
        per_lang: Dict[str, int] = {}
        total = _write_encoded(ds, ls, bpe, vocab, f, dtype, builders, per_lang)
        del ds, ls
        new = dict(man)
        new["vocab"] = UnitVocab(codebook_size=bpe.size, languages=vocab.languages, lang_tags=vocab.lang_tags,
                                 sentence_sep=vocab.sentence_sep, dedup=vocab.dedup).to_dict()
        new["token_vocab_size"] = tok_size
        new["dtype"] = np.dtype(dtype).name
        new["bpe"] = {"model": os.path.abspath(model_path), "pieces": bpe.size,
                      "unit_codebook_size": vocab.codebook_size, "unit_char_base": CHAR_BASE,
                      "encoded_from": os.path.abspath(in_prefix)}
        new["tokens"] = dict(man["tokens"], total=int(total),
                             per_language={k: per_lang.get(k, 0) for k in list(vocab.languages) + ["none"]})
        new["content_hash"] = hash_files([f + ".bin", lang_prefix(f) + ".bin"], CONTENT_HASH)
        new["content_hash_algorithm"] = CONTENT_HASH
        commit_dataset(f, out_prefix, new)
        return new
    finally:
        for bld in builders:        # on error: the builders' files are still open
            data_file = getattr(bld, "data_file", None)
            if data_file is not None and not data_file.closed:
                try:
                    data_file.close()
                except OSError:
                    pass
        shutil.rmtree(tmp, ignore_errors=True)


def _write_encoded(ds, ls, bpe: "UnitBPE", vocab, f: str, dtype, builders: list, per_lang: Dict[str, int]) -> int:
    """Every document of ``ds`` (tokens) and ``ls`` (languages) BPE-encoded into ``f``.bin/.idx and its language
    channel with megatron-core's builders (appended to ``builders`` as they open); ``per_lang`` counts the
    tokens per language. Returns the number of tokens written."""
    from megaslm.vocab import lang_prefix

    tbin, lbin = f + ".bin", lang_prefix(f) + ".bin"
    with writing(tbin):
        tb = new_builder(f, dtype)
        builders.append(tb)
    with writing(lbin):
        lb = new_builder(lang_prefix(f), np.uint8)
        builders.append(lb)
    total = 0
    for d in range(len(ds)):
        t, l = _encode_document(ds[d].astype(np.int64), ls[d], bpe, vocab, per_lang)
        total += t.size
        with writing(tbin):
            tb.add_document(t, [t.size])
        with writing(lbin):
            lb.add_document(l, [l.size])
    for bld, bin_path, idx_path in ((tb, tbin, f + ".idx"), (lb, lbin, lang_prefix(f) + ".idx")):
        with writing(bin_path):
            bld.data_file.close()       # its last buffered bytes (finalize closes it first too)
        with writing(idx_path):
            bld.finalize(idx_path)
    return total


def _encode_document(ids: np.ndarray, lid: np.ndarray, bpe: "UnitBPE", vocab, per_lang: Dict[str, int]):
    """One document's tokens and languages -> BPE-encoded (tokens, languages): each run of units of one
    language is encoded on its own; special tokens are kept."""
    off = vocab.offset
    is_unit = ids >= off
    # run boundaries: where unit-ness or language changes
    cut = np.flatnonzero((is_unit[1:] != is_unit[:-1]) | (lid[1:] != lid[:-1])) + 1
    out_ids, out_l = [], []
    for a, b in zip(np.r_[0, cut], np.r_[cut, ids.size]):
        if is_unit[a]:
            p = bpe.encode(ids[a:b] - off) + off
            out_ids.append(p)
            out_l.append(np.full(p.size, lid[a], dtype=np.uint8))
            name = vocab.languages[int(lid[a]) - 1] if lid[a] else "none"
            per_lang[name] = per_lang.get(name, 0) + int(p.size)
        else:
            out_ids.append(ids[a:b])
            out_l.append(lid[a:b])
            per_lang["none"] = per_lang.get("none", 0) + int(b - a)
    return np.concatenate(out_ids), np.concatenate(out_l)
