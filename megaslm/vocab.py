"""Unit vocabulary and on-disk dataset conventions shared by data_tools, training and evals.

Torch-free on purpose (ARCHITECTURE.md: data_tools may import only these constants from megaslm).

Token id layout (the model's vocabulary)::

    0            pad
    1            bos
    2            eod                      (end of document: a story / utterance boundary)
    3..          one tag per language     (only when ``lang_tags`` is on; off by default, as in the paper)
    next         sentence separator       (only when ``sentence_sep`` is on; off by default)
    offset..     units 0..codebook_size-1 (id = offset + unit)

Language side channel: every token carries a language id (uint8): 0 = none (special tokens),
1.. = ``languages[i-1]``. It is stored as a second indexed dataset aligned token-for-token with the
unit stream (same document lengths): ``<prefix>.bin/.idx`` and ``<prefix>.lang.bin/.idx``; the
manifest is ``<prefix>.manifest.json``.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Sequence, Tuple

PAD_ID = 0
BOS_ID = 1
EOD_ID = 2
NUM_BASE_SPECIALS = 3

LANG_NONE = 0  # language id of special tokens in the side channel

LANG_SUFFIX = ".lang"          # <prefix>.lang.bin / .idx : the language side channel
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 1

# The manifest's ``content_hash``: XXH3-128 over the token ``.bin`` then the language ``.bin`` (new builds
# record ``content_hash_algorithm``; manifests written before it was recorded used SHA-256). Why not
# SHA-256: the hash detects corruption and mismatched files (no adversary), and SHA-256 ran at ~1.8 GB/s
# here -- the largest single cost of a binary-input build and of ``data.verify_hash`` at start-up
# (minutes for a 100 GB dataset); XXH3 runs at ~40 GB/s with 128 bits against accidental collisions
# (the checksum Hugging Face datasets fingerprints with and zstd frames carry, in its 64-bit form).
CONTENT_HASH = "xxh3_128"
LEGACY_CONTENT_HASH = "sha256"

# megatron-core's indexed dataset layout (megatron/core/datasets/indexed_dataset.py: _INDEX_HEADER, DType,
# _IndexWriter; version 1): the .idx holds this header, version <Q, dtype code <B, sequence count <Q, document
# count <Q, then int32 lengths, int64 byte pointers, int64 document indices (and, for multimodal sets, int8
# modes); the .bin the tokens. data_tools writes it (common.write_index), training checks it (data.inspect_indexed).
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_VERSION = 1
IDX_HEAD = len(IDX_MAGIC) + 8 + 1 + 8 + 8      # magic, version, dtype code, sequence count, document count
# (numpy dtype name, megatron's DType code, bytes per item)
_IDX_DTYPES = (("uint8", 1, 1), ("int8", 2, 1), ("int16", 3, 2), ("int32", 4, 4), ("int64", 5, 8),
               ("float64", 6, 8), ("float32", 7, 4), ("uint16", 8, 2))
IDX_DTYPE_CODES = {name: code for name, code, _ in _IDX_DTYPES}
IDX_ITEMSIZE = {code: size for _, code, size in _IDX_DTYPES}

# Frame rates (units per second) of the usual unit sources, for hour accounting.
FRAME_RATES = {"mimi": 12.5, "hubert25": 25.0, "hubert50": 50.0}


class VocabError(ValueError):
    """A vocabulary description or a unit id that does not fit it."""


@dataclasses.dataclass(frozen=True)
class UnitVocab:
    codebook_size: int = 2048
    languages: Tuple[str, ...] = ("en", "fr")
    lang_tags: bool = False
    sentence_sep: bool = False
    dedup: bool = False
    # Which tokeniser made the units ("" = not recorded, e.g. units made outside data_tools): an id such as
    # "mimi:ckpt=1a2b3c4d5e6f:codebook=0:k=2048:fps=12.5" (data_tools.audio writes it). Part of equality,
    # so a run / benchmark refuses units from another tokeniser, checkpoint, layer or k-means codebook.
    unit_source: str = ""

    def __post_init__(self):
        if not isinstance(self.codebook_size, int) or self.codebook_size <= 0:
            raise VocabError(f"vocab.codebook_size: expected a positive integer, got {self.codebook_size!r}")
        langs = tuple(self.languages)
        object.__setattr__(self, "languages", langs)
        if len(set(langs)) != len(langs) or not all(isinstance(l, str) and l for l in langs):
            raise VocabError(f"vocab.languages: expected distinct non-empty names, got {list(langs)!r}")
        if not isinstance(self.unit_source, str):
            raise VocabError(f"vocab.unit_source: expected a string, got {self.unit_source!r}")
        if len(langs) > 254:
            raise VocabError("vocab.languages: at most 254 languages fit the uint8 side channel")

    # ---- layout -------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eod_id(self) -> int:
        return EOD_ID

    def lang_tag_id(self, lang: str) -> int:
        if not self.lang_tags:
            raise VocabError("language tags are off in this vocabulary (vocab.lang_tags=false)")
        return NUM_BASE_SPECIALS + self.languages.index(lang)

    @property
    def sep_id(self) -> int:
        if not self.sentence_sep:
            raise VocabError("the sentence separator is off in this vocabulary (vocab.sentence_sep=false)")
        return NUM_BASE_SPECIALS + (len(self.languages) if self.lang_tags else 0)

    @property
    def offset(self) -> int:
        return NUM_BASE_SPECIALS + (len(self.languages) if self.lang_tags else 0) + (1 if self.sentence_sep else 0)

    @property
    def size(self) -> int:
        """Number of real token ids (before any padding for tensor parallelism)."""
        return self.offset + self.codebook_size

    def lang_id(self, lang: str) -> int:
        """Side-channel id of a language (1-based; 0 is 'none')."""
        try:
            return 1 + self.languages.index(lang)
        except ValueError:
            raise VocabError(f"unknown language {lang!r}; this vocabulary has {list(self.languages)}") from None

    @property
    def num_lang_ids(self) -> int:
        return 1 + len(self.languages)

    # ---- mapping ------------------------------------------------------------------------
    def encode_units(self, units: Sequence[int]) -> List[int]:
        """Units -> token ids (dedup of consecutive repeats when the vocabulary says so)."""
        out: List[int] = []
        prev = None
        for u in units:
            if self.dedup and u == prev:
                continue
            prev = u
            out.append(self.offset + int(u))
        return out

    def decode_ids(self, ids: Sequence[int]) -> List[int]:
        """Token ids -> units; special tokens are dropped."""
        off = self.offset
        return [int(i) - off for i in ids if off <= int(i) < off + self.codebook_size]

    # ---- persistence --------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["languages"] = list(self.languages)
        if not self.unit_source:      # unrecorded: keep manifests written before the field existed unchanged
            del d["unit_source"]
        d.update(offset=self.offset, size=self.size, pad_id=PAD_ID, bos_id=BOS_ID, eod_id=EOD_ID)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "vocab") -> "UnitVocab":
        fields = {f.name for f in dataclasses.fields(cls)}
        derived = {"offset", "size", "pad_id", "bos_id", "eod_id"}
        unknown = set(d) - fields - derived
        if unknown:
            raise VocabError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(fields)}")
        if not isinstance(d.get("unit_source", ""), str):
            raise VocabError(f"{where}.unit_source: expected a string, got {d['unit_source']!r}")
        v = cls(**{k: (tuple(d[k]) if k == "languages" else d[k]) for k in fields if k in d})
        for k in derived & set(d):
            if d[k] != v.to_dict()[k]:
                raise VocabError(f"{where}.{k}: recorded {d[k]!r} but the layout gives {v.to_dict()[k]!r}")
        return v


    def differences(self, other: "UnitVocab") -> List[str]:
        """Names of the fields (incl. unit_source) where two vocabularies differ."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def manifest_path(prefix: str) -> str:
    return prefix + MANIFEST_SUFFIX


def lang_prefix(prefix: str) -> str:
    return prefix + LANG_SUFFIX


def read_manifest(prefix: str) -> Dict[str, Any]:
    path = manifest_path(prefix)
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise VocabError(f"{path}: dataset manifest not found (build the dataset with data_tools)") from None
    except json.JSONDecodeError as e:
        raise VocabError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    if "vocab" not in m:
        raise VocabError(f"{path}: field 'vocab' missing")
    return m


def vocab_from_manifest(prefix: str) -> UnitVocab:
    return UnitVocab.from_dict(read_manifest(prefix)["vocab"], where=manifest_path(prefix) + ":vocab")


def content_hasher(algorithm: str = CONTENT_HASH):
    """A fresh hash object for a manifest's ``content_hash`` (``update(buffer)``, ``hexdigest()``)."""
    if algorithm == "xxh3_128":
        import xxhash
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        import hashlib
        return hashlib.sha256()
    raise VocabError(f"content_hash_algorithm: unknown {algorithm!r}; expected 'xxh3_128' or 'sha256'")


def content_hash_algorithm(manifest: Dict[str, Any]) -> str:
    """The algorithm a manifest's ``content_hash`` was made with (SHA-256 before it was recorded)."""
    return manifest.get("content_hash_algorithm") or LEGACY_CONTENT_HASH


def hash_files(paths: Sequence[str], algorithm: str = CONTENT_HASH) -> str:
    """``content_hash`` of the files, in order (read in 4 MiB blocks)."""
    h = content_hasher(algorithm)
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
