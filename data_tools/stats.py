"""`inspect`: statistics of a built dataset, read through megatron-core's IndexedDataset."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np

from megaslm.vocab import lang_prefix, read_manifest

from data_tools.common import atomic_path
from data_tools.errors import DataError


def read_document(prefix: str, i: int):
    """(token ids, language ids) of document ``i`` -- how training/eval code reads the side channel.

    Copies: megatron-core's IndexedDataset.__del__ closes its mmap, and an array still viewing it
    then segfaults. Keep the IndexedDataset alive as long as you use views of it (or copy).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds, ls = IndexedDataset(prefix), IndexedDataset(lang_prefix(prefix))
    return np.array(ds[i]), np.array(ls[i])


def dataset_stats(prefix: str, histogram_png: Optional[str] = None, block_tokens: int = 1 << 24,
                  verify_hash: bool = False) -> Dict[str, Any]:
    for p in (prefix, lang_prefix(prefix)):
        for ext in (".bin", ".idx"):
            if not os.path.isfile(p + ext):
                raise DataError("dataset file not found", path=p + ext)
    # megatron-core (it imports torch: ~7 s of CPU) once the files are there: a missing one is said at once
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    try:
        man = read_manifest(prefix)
    except ValueError as e:
        raise DataError(str(e)) from None
    languages = list(man["vocab"]["languages"])
    ds, ls = IndexedDataset(prefix), IndexedDataset(lang_prefix(prefix))
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    if not np.array_equal(lengths, np.asarray(ls.sequence_lengths)):
        raise DataError("language channel is not aligned with the tokens (document lengths differ)",
                        path=lang_prefix(prefix) + ".idx")
    lang_tokens = np.memmap(lang_prefix(prefix) + ".bin", dtype=np.uint8, mode="r")
    counts = np.zeros(256, dtype=np.int64)
    switches = 0
    n = len(lengths)
    doc_lang = np.empty(n, dtype=np.int16)   # per document: its one language, mixed or none (_document_languages)
    ends = np.cumsum(lengths)
    start_doc, start_tok = 0, 0
    while start_doc < n:   # blocks of whole documents: bounded memory
        end_doc = int(np.searchsorted(ends, start_tok + block_tokens, side="right"))
        end_doc = max(end_doc, start_doc + 1)
        end_tok = int(ends[end_doc - 1])
        L = np.asarray(lang_tokens[start_tok:end_tok])
        counts += np.bincount(L, minlength=256)
        docid = np.repeat(np.arange(end_doc - start_doc), lengths[start_doc:end_doc])
        nz = np.flatnonzero(L)
        Ls, Ds = L[nz], docid[nz]
        switches += int(np.count_nonzero((Ls[1:] != Ls[:-1]) & (Ds[1:] == Ds[:-1])))
        doc_lang[start_doc:end_doc] = _document_languages(L, docid, end_doc - start_doc, len(languages))
        start_doc, start_tok = end_doc, end_tok
    total = int(lengths.sum())
    per_lang = {l: int(counts[i + 1]) for i, l in enumerate(languages)}
    per_lang["none"] = int(counts[0])
    classes = languages + ["mixed", "none"]
    bounds = man.get("sentence_boundaries")
    out = {
        "prefix": prefix,
        "documents": n,
        "tokens": total,
        "per_language": per_lang,
        "documents_by_language": {c: int(k) for c, k in zip(classes, np.bincount(doc_lang, minlength=len(classes)))
                                  if k},
        "language_switches": switches,
        "switch_rate_per_token": switches / total if total else 0.0,
        "switch_rate_per_sentence_boundary": (switches / bounds) if bounds else None,
        "doc_length": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max()),
                       "p50": float(np.percentile(lengths, 50)), "p99": float(np.percentile(lengths, 99))},
        "mode": man.get("mode"), "p": man.get("p"), "hours": man.get("hours"),
        "manifest_tokens": man.get("tokens", {}).get("total"),
    }
    if verify_hash:
        from megaslm.vocab import content_hash_algorithm, hash_files
        h = hash_files([prefix + ".bin", lang_prefix(prefix) + ".bin"], content_hash_algorithm(man))
        out["content_hash_ok"] = h == man.get("content_hash")
    if histogram_png:
        out["histogram"] = _write_histogram(lengths, doc_lang, classes, histogram_png, os.path.basename(prefix))
    return out


def _document_languages(L: np.ndarray, docid: np.ndarray, ndocs: int, nlang: int) -> np.ndarray:
    """Per document of a block: the index of its one language, ``nlang`` when it mixes several (interleaved),
    ``nlang + 1`` when none (no language id on any token)."""
    present = np.stack([np.bincount(docid[L == i + 1], minlength=ndocs) > 0 for i in range(nlang)]) \
        if nlang else np.zeros((0, ndocs), dtype=bool)
    k = present.sum(0)
    return np.where(k == 1, present.argmax(0), np.where(k > 1, nlang, nlang + 1))


def histogram_figure(lengths: np.ndarray, doc_lang: np.ndarray, classes, title: str):
    """Document lengths split by language: one outlined histogram per class (a language, mixed, none) on shared
    bins, each labelled with its document count; returns the Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.histogram_bin_edges(lengths, bins=min(50, max(1, len(np.unique(lengths)))))
    for i, c in enumerate(classes):
        sel = lengths[doc_lang == i]
        if len(sel):
            ax.hist(sel, bins=bins, histtype="step", linewidth=1.5, label=f"{c} ({len(sel):,} documents)")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title(f"{title}: document length by language", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _write_histogram(lengths: np.ndarray, doc_lang: np.ndarray, classes, histogram_png: str, title: str) -> str:
    """The document-length histogram by language as an image (its format from the name's extension), written
    whole or not at all (a full disk leaves no truncated image); returns the name written."""
    import matplotlib
    import matplotlib.pyplot as plt
    fig = histogram_figure(lengths, doc_lang, classes, title)
    fmt = os.path.splitext(histogram_png)[1][1:].lower()
    if not fmt:                 # what savefig does with a name without an extension
        fmt = matplotlib.rcParams["savefig.format"]
        histogram_png = f"{histogram_png}.{fmt}"
    try:
        with atomic_path(histogram_png, what="the histogram", after="no histogram was written") as tmp:
            fig.savefig(tmp, dpi=100, format=fmt)
    except ValueError as e:     # a format matplotlib does not write (the name's extension)
        raise DataError(f"cannot write the histogram ({e})", path=histogram_png) from None
    finally:
        plt.close(fig)
    return histogram_png


def format_stats(s: Dict[str, Any]) -> str:
    lines = [f"dataset   {s['prefix']}  (mode={s['mode']}, p={s['p']})",
             f"documents {s['documents']:,}   tokens {s['tokens']:,}"]
    for l, c in s["per_language"].items():
        lines.append(f"  {l:<6} {c:>14,} tokens  {100.0 * c / max(1, s['tokens']):6.2f}%")
    if s.get("documents_by_language"):
        lines.append("documents by language: " + ", ".join(f"{k} {v:,}" for k, v in s["documents_by_language"].items()))
    sb = s["switch_rate_per_sentence_boundary"]
    lines.append(f"language switches {s['language_switches']:,}: {s['switch_rate_per_token']:.5f} per token"
                 + (f", {sb:.4f} per sentence boundary" if sb is not None else ""))
    d = s["doc_length"]
    lines.append(f"doc length min {d['min']} p50 {d['p50']:.0f} mean {d['mean']:.1f} p99 {d['p99']:.0f} max {d['max']}")
    if s.get("hours"):
        lines.append("hours " + ", ".join(f"{k} {v:.2f}" for k, v in s["hours"].items()))
    if "content_hash_ok" in s:
        lines.append(f"content hash {'OK' if s['content_hash_ok'] else 'MISMATCH'}")
    if s.get("histogram"):
        lines.append(f"histogram {s['histogram']}")
    return "\n".join(lines)
