"""``python -m data_tools adopt PREFIX --codebook-size N [--offset K] [--language L]``: an indexed dataset written
by megatron-core's own ``IndexedDatasetBuilder`` (as Megatron-LM's tools/preprocess_data.py writes one) made
usable for training as it is, without a rebuild.

Checked first, reading only: the index (megatron-core's layout, ``megaslm.vocab.IDX_*``: magic, version, an
integer dtype, sequence lengths that add up to the ``.bin``'s size, byte pointers that follow them, document
indices from 0 to the sequence count) and every token against the vocabulary's id layout
(``megaslm.vocab.UnitVocab``: pad 0, bos 1, eod 2, [tags], [separator], units from ``offset``): each id below
the vocabulary's size, and the units where the file put them (``--offset``, the id of unit 0, must be the
vocabulary's; adopt never rewrites tokens). Then written, each file whole or not at all: with ``--language``
the language side channel (``PREFIX.lang.bin/.idx``: that language for every unit, 0 for the special ids; the
same sequences and documents as the tokens), and the manifest last (``PREFIX.manifest.json``: the vocabulary,
counts and content hash training checks, ``megaslm.data.check_manifest``). Any refusal is one line and writes
nothing; a dataset that already has a manifest (a build's, or an earlier adopt's) is refused.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, Optional

import numpy as np

from megaslm.vocab import (CONTENT_HASH, IDX_DTYPE_CODES, IDX_HEAD, IDX_ITEMSIZE, IDX_MAGIC, IDX_VERSION,
                           LANG_NONE, UnitVocab, content_hasher, lang_prefix, manifest_path)

from data_tools.build import make_manifest
from data_tools.common import OutputFiles
from data_tools.engine import hash_file
from data_tools.errors import FileError
from data_tools.formats import InputSpec
from data_tools.streams import BuildOptions, Stats

_INT_CODES = {code: np.dtype(name) for name, code in IDX_DTYPE_CODES.items() if np.dtype(name).kind in "iu"}
BLOCK = 1 << 24          # tokens per block of the scan (128 MiB of int64 at most)


def read_index(prefix: str) -> Dict[str, Any]:
    """The index of ``prefix`` checked against its ``.bin``: {dtype, lengths, documents, size, raw (bytes)}."""
    idx, binp = prefix + ".idx", prefix + ".bin"
    for path in (binp, idx):
        if not os.path.isfile(path):
            raise FileError("not found (adopt reads an existing megatron-core .bin/.idx pair)", path=path)
    with open(idx, "rb") as f:
        raw = f.read()
    if len(raw) < IDX_HEAD or raw[:len(IDX_MAGIC)] != IDX_MAGIC:
        raise FileError(f"not a megatron-core indexed-dataset index (bad magic or truncated header, {len(raw)} "
                        f"bytes); expected what IndexedDatasetBuilder.finalize writes", path=idx)
    version, code, n, d = struct.unpack("<QBQQ", raw[len(IDX_MAGIC):IDX_HEAD])
    if version != IDX_VERSION:
        raise FileError(f"index version {version}; expected {IDX_VERSION}", path=idx)
    if code not in _INT_CODES:
        raise FileError(f"dtype code {code} ({'unknown' if code not in IDX_ITEMSIZE else 'floating point'}); "
                        f"expected integer tokens (codes {sorted(_INT_CODES)})", path=idx)
    expected = IDX_HEAD + 12 * n + 8 * d
    if len(raw) not in (expected, expected + n):      # + n: the optional per-sequence mode bytes
        raise FileError(f"{len(raw)} bytes, expected {expected} for {n} sequences and {d} document indices "
                        f"(truncated or corrupt)", path=idx)
    dtype = _INT_CODES[code]
    lengths = np.frombuffer(raw, np.int32, n, IDX_HEAD).astype(np.int64)
    pointers = np.frombuffer(raw, np.int64, n, IDX_HEAD + 4 * n)
    docs = np.frombuffer(raw, np.int64, d, IDX_HEAD + 12 * n)
    if n and int(lengths.min()) < 0:
        raise FileError("a negative sequence length (corrupt index)", path=idx)
    tokens = int(lengths.sum())
    size = os.path.getsize(binp)
    if size != tokens * dtype.itemsize:
        raise FileError(f"{size} bytes, expected {tokens * dtype.itemsize} ({tokens} tokens x {dtype.itemsize} bytes "
                        f"of {dtype.name}, from {idx})", path=binp)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) * dtype.itemsize if n else pointers
    if not np.array_equal(pointers, starts):
        raise FileError("byte pointers do not follow the sequence lengths (corrupt index)", path=idx)
    if d < 1 or docs[0] != 0 or docs[-1] != n or np.any(np.diff(docs) < 0):
        raise FileError(f"document indices are not 0 ... {n} in order (corrupt index)", path=idx)
    return {"dtype": dtype, "lengths": lengths, "documents": d - 1, "tokens": tokens, "raw": raw, "n": n}


def _lang_index(index: Dict[str, Any]) -> bytes:
    """The language channel's index: the tokens' (same sequences, documents, modes) with uint8 items."""
    n, raw = index["n"], bytearray(index["raw"])
    raw[len(IDX_MAGIC) + 8] = IDX_DTYPE_CODES["uint8"]
    ptr = np.zeros(n, np.int64)
    if n:
        np.cumsum(index["lengths"][:-1], out=ptr[1:])
    raw[IDX_HEAD + 4 * n:IDX_HEAD + 12 * n] = ptr.tobytes()
    return bytes(raw)


def _scan(prefix: str, index, vocab: UnitVocab, lang_id: Optional[int], lang_file) -> Dict[str, Any]:
    """Every token checked against the vocabulary, block by block; the language channel written alongside."""
    binp, dtype = prefix + ".bin", index["dtype"]
    total, off = index["tokens"], vocab.offset
    specials = np.zeros(off, np.int64)
    tokens = np.memmap(binp, dtype=dtype, mode="r") if total else np.zeros(0, dtype)
    for s in range(0, total, BLOCK):
        blk = np.asarray(tokens[s:s + BLOCK])
        bad = (blk < 0) | (blk >= vocab.size)
        if bad.any():
            i = s + int(np.argmax(bad))
            doc = int(np.searchsorted(np.cumsum(index["lengths"]), i, side="right"))
            raise FileError(f"token {i} (sequence {doc}): id {int(tokens[i])} outside the vocabulary [0, {vocab.size}) "
                            f"(codebook {vocab.codebook_size} at offset {off}); expected --codebook-size (and "
                            f"--lang-tags / --sentence-sep) as the file was written", path=binp)
        is_special = blk < off
        specials += np.bincount(blk[is_special].astype(np.int64), minlength=off)
        if lang_file is not None:
            lang_file.write(np.where(is_special, LANG_NONE, lang_id).astype(np.uint8).tobytes())
    ends = np.cumsum(index["lengths"])[index["lengths"] > 0] - 1
    eod_ends = int(np.count_nonzero(np.asarray(tokens[ends]) == vocab.eod_id)) if ends.size else 0
    del tokens
    return {"specials": specials, "units": total - int(specials.sum()), "eod_ends": eod_ends,
            "sequences": int(ends.size)}


def adopt(prefix: str, vocab: UnitVocab, offset: Optional[int] = None, language: Optional[str] = None,
          source_type: str = "mimi", frame_rate: Optional[float] = None) -> Dict[str, Any]:
    """Check ``prefix.bin/.idx`` and write its manifest (and language channel); returns the manifest."""
    if os.path.exists(manifest_path(prefix)):
        raise FileError("a manifest is already there (a data_tools build, or adopted before): nothing to adopt",
                        path=manifest_path(prefix))
    if offset is not None and offset != vocab.offset:
        raise FileError(f"--offset {offset}: the vocabulary puts unit 0 at id {vocab.offset} (pad 0, bos 1, eod 2"
                        f"{', language tags' if vocab.lang_tags else ''}{', separator' if vocab.sentence_sep else ''} "
                        f"before it); adopt does not rewrite tokens: rebuild from the units with `python -m "
                        f"data_tools build`", path=prefix + ".bin")
    if language is not None and language not in vocab.languages:
        raise FileError(f"--language {language}: not in the vocabulary's languages {list(vocab.languages)} "
                        f"(--languages)", path=prefix + ".bin")
    opts = BuildOptions(vocab=vocab, lang=language, source_type=source_type, frame_rate=frame_rate)
    index = read_index(prefix)
    lp = lang_prefix(prefix)
    with OutputFiles("the adopted dataset", after="nothing was written") as out:
        if language is None:
            got = _scan(prefix, index, vocab, None, None)
        else:
            with out.open(lp + ".bin", "wb") as lf:
                got = _scan(prefix, index, vocab, vocab.lang_id(language), lf)
            with out.open(lp + ".idx", "wb") as f:
                f.write(_lang_index(index))
        h = content_hasher(CONTENT_HASH)
        for path in [prefix + ".bin"] + ([lp + ".bin"] if language else []):
            hash_file(h, path)
        manifest = _manifest(prefix, opts, index, got, language, h.hexdigest())
        with out.open(manifest_path(prefix)) as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
    return manifest


def _manifest(prefix, opts: BuildOptions, index, got, language, content_hash) -> Dict[str, Any]:
    vocab, units = opts.vocab, got["units"]
    names = ["pad", "bos", "eod"] + [f"tag:{l}" for l in (vocab.languages if vocab.lang_tags else ())] + \
        (["sep"] if vocab.sentence_sep else [])
    st = Stats(tokens=index["tokens"], documents=index["documents"], sentences=index["documents"], units_in=units,
               per_language={"none": int(got["specials"].sum()), **({language: units} if language else {})},
               per_source={os.path.basename(prefix): index["tokens"]}, frames={language: units} if language else {})
    m = make_manifest(opts, [InputSpec(prefix + ".bin", os.path.basename(prefix))], st,
                      vocab.size, index["dtype"], content_hash, 0, None)
    if language is None:
        m["tokens"]["per_language"] = {"unknown": units, "none": st.per_language["none"]}
        m["hours"], m["mono_language"] = {}, None
    m["lang_channel"] = ".lang" if language else None
    m["adopted"] = {"from": "megatron-core IndexedDatasetBuilder .bin/.idx (python -m data_tools adopt)",
                    "sequences": index["n"], "unit_offset": vocab.offset,
                    "special_tokens": {n: int(c) for n, c in zip(names, got["specials"])},
                    "sequences_ending_with_eod": got["eod_ends"], "language": language}
    return m


__all__ = ["adopt", "read_index"]
