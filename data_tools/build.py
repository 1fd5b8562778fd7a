"""The build pipeline: inputs -> (worker shards) -> one megatron-core indexed dataset + language channel.

Streaming: the main process reads items lazily and hands chunks to workers (at most 2 chunks per
worker in flight); each chunk becomes one shard pair (tokens, languages); shards are merged in input
order with megatron-core's IndexedDatasetBuilder.add_index. Everything is written under
``<prefix>.tmp-<pid>/`` next to the destination and moved into place at the end, manifest last.
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from megaslm.vocab import LANG_SUFFIX, MANIFEST_VERSION, lang_prefix, manifest_path

from data_tools.errors import DataError
from data_tools.formats import InputSpec, check_inputs, iter_chunks, iter_items, parse_item
from data_tools.streams import RANDOM_MODES, BuildOptions, Encoder, Stats, record_documents, story_rng

_CTX: Dict[str, Any] = {}


def token_dtype(vocab_size: int):
    from megatron.core.datasets.indexed_dataset import DType
    return DType.optimal_dtype(vocab_size)


def _builder(path_prefix: str, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder(path_prefix + ".bin", dtype=dtype)


def append_shard(builder, path_prefix: str) -> None:
    """IndexedDatasetBuilder.add_index without its gc.collect() per call (~0.2 s each once torch is
    imported): same index arithmetic, same bytes."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    idx = IndexedDataset(path_prefix, mmap=True)
    if idx.index.dtype != builder.dtype:
        raise DataError(f"shard dtype {idx.index.dtype} != {builder.dtype}", path=path_prefix)
    off = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(idx.sequence_lengths.tolist())
    builder.document_indices.extend((off + idx.document_indices[1:]).tolist())
    del idx
    with open(path_prefix + ".bin", "rb") as f:
        shutil.copyfileobj(f, builder.data_file)


def _init_worker(ctx: Dict[str, Any]) -> None:
    _CTX.clear()
    _CTX.update(ctx)
    _CTX["encoder"] = Encoder(ctx["opts"].vocab, ctx["opts"].bpe_model)


def _process_chunk(job) -> Dict[str, Any]:
    """Parse, validate and convert one chunk of items; write its shard. Runs in a worker."""
    index, items = job
    opts: BuildOptions = _CTX["opts"]
    inputs: List[InputSpec] = _CTX["inputs"]
    vocab = opts.vocab
    stats, bad = Stats(), []
    docs_out = []
    for fi, line, text in items:
        spec = inputs[fi]
        try:
            rec = parse_item(spec, line, text, vocab.codebook_size, vocab.languages, opts.story_langs, opts.lang)
            st = Stats()
            docs = record_documents(rec, spec.source, opts, _CTX["encoder"],
                                    story_rng(opts.seed, fi, line) if rec.kind == "story" else None, st)
        except DataError as e:
            if e.path is None:      # errors raised without a location: add it
                e = DataError(e.reason, path=spec.path, line=line, field=e.field)
            if not opts.skip_bad:
                raise e
            bad.append({"input": e.path, "line": e.line, "field": e.field, "error": e.reason, "message": str(e)})
            stats.bad += 1
            continue
        stats.add(st)
        docs_out.extend(docs)
    shard = None
    if docs_out:
        shard = os.path.join(_CTX["tmpdir"], f"shard-{index:06d}")
        tb, lb = _builder(shard, _CTX["dtype"]), _builder(lang_prefix(shard), np.uint8)
        for ids, lid in docs_out:
            tb.add_document(ids, [ids.size])
            lb.add_document(lid, [lid.size])
        tb.finalize(shard + ".idx")
        lb.finalize(lang_prefix(shard) + ".idx")
    return {"shard": shard, "stats": stats, "bad": bad}


def _sha256(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _progress(opts: BuildOptions, desc: str):
    from tqdm import tqdm
    return tqdm(desc=desc, unit="rec", disable=not (opts.progress and sys.stderr.isatty()), file=sys.stderr)


def _run_chunks(jobs, opts: BuildOptions, ctx: Dict[str, Any]):
    """Yield chunk results in input order, with at most 2 chunks per worker in flight."""
    if opts.workers == 1:
        _init_worker(ctx)
        for job in jobs:
            yield _process_chunk(job), len(job[1])
        return
    pool = multiprocessing.get_context("fork").Pool(opts.workers, initializer=_init_worker, initargs=(ctx,))
    try:
        pending = collections.deque()
        for job in jobs:
            pending.append((pool.apply_async(_process_chunk, (job,)), len(job[1])))
            while len(pending) >= 2 * opts.workers:
                r, n = pending.popleft()
                yield r.get(), n
        while pending:
            r, n = pending.popleft()
            yield r.get(), n
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def vocab_size_of(opts: BuildOptions) -> int:
    if opts.bpe_model:
        from data_tools.bpe import UnitBPE
        return opts.vocab.offset + UnitBPE.load(opts.bpe_model).size
    return opts.vocab.size


def build_dataset(inputs: Sequence[Union[str, InputSpec]], output_prefix: str,
                  opts: Optional[BuildOptions] = None, **kwargs) -> Dict[str, Any]:
    """Build ``<output_prefix>.bin/.idx``, ``.lang.bin/.idx`` and ``.manifest.json``; return the manifest.

    ``inputs``: paths or ``NAME=PATH`` specs (JSONL utterances or stories, .npy + .bounds.jsonl, .npz).
    Options: a BuildOptions, or its fields as keyword arguments. Raises DataError on bad input
    (unless ``skip_bad``); never leaves a partial dataset under ``output_prefix``.
    """
    if opts is None:
        opts = BuildOptions(**kwargs)
    elif kwargs:
        opts = BuildOptions(**{**opts.__dict__, **kwargs})
    specs = [s if isinstance(s, InputSpec) else InputSpec.parse(str(s)) for s in inputs]
    check_inputs(specs)
    if opts.bpe_model and not os.path.isfile(opts.bpe_model):
        raise DataError("BPE model not found", path=opts.bpe_model)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmpdir = f"{output_prefix}.tmp-{os.getpid()}"
    shutil.rmtree(tmpdir, ignore_errors=True)
    os.makedirs(tmpdir)
    try:
        tok_size = vocab_size_of(opts)
        dtype = token_dtype(tok_size)
        ctx = {"opts": opts, "inputs": specs, "tmpdir": tmpdir, "dtype": dtype}
        jobs = enumerate(iter_chunks(iter_items(specs), opts.chunk_size))
        total, shards, bad = Stats(), [], []
        results = _run_chunks(jobs, opts, ctx)
        try:
            with _progress(opts, f"build {os.path.basename(output_prefix)}") as bar:
                for res, n in results:
                    total.add(res["stats"])
                    bad.extend(res["bad"])
                    if res["shard"]:
                        shards.append(res["shard"])
                    bar.update(n)
        finally:
            results.close()     # on error: terminate and join the workers before removing the temps
        if total.documents == 0:
            raise DataError("no valid records: refusing to write an empty dataset"
                            + (f" ({len(bad)} quarantined)" if bad else ""), path=specs[0].path)

        final = os.path.join(tmpdir, "final")
        tb, lb = _builder(final, dtype), _builder(lang_prefix(final), np.uint8)
        for s in shards:
            append_shard(tb, s)
            append_shard(lb, lang_prefix(s))
        tb.finalize(final + ".idx")
        lb.finalize(lang_prefix(final) + ".idx")
        for s in shards:
            for p in (s, lang_prefix(s)):
                os.remove(p + ".bin")
                os.remove(p + ".idx")

        quarantine_path = None
        if bad:
            quarantine_path = output_prefix + ".quarantine.jsonl"
            with open(os.path.join(tmpdir, "quarantine.jsonl"), "w") as f:
                for b in bad:
                    f.write(json.dumps(b) + "\n")

        manifest = make_manifest(opts, specs, total, tok_size, dtype,
                                 _sha256([final + ".bin", lang_prefix(final) + ".bin"]),
                                 len(bad), quarantine_path)
        with open(os.path.join(tmpdir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.write("\n")

        # commit: drop an old manifest first (an interrupted commit then reads as "no dataset"),
        # move the data files, the manifest last.
        if os.path.exists(manifest_path(output_prefix)):
            os.remove(manifest_path(output_prefix))
        for src, dst in ((final, output_prefix), (lang_prefix(final), lang_prefix(output_prefix))):
            os.replace(src + ".bin", dst + ".bin")
            os.replace(src + ".idx", dst + ".idx")
        if quarantine_path:
            os.replace(os.path.join(tmpdir, "quarantine.jsonl"), quarantine_path)
        elif os.path.exists(output_prefix + ".quarantine.jsonl"):
            os.remove(output_prefix + ".quarantine.jsonl")
        os.replace(os.path.join(tmpdir, "manifest.json"), manifest_path(output_prefix))
        return manifest
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def make_manifest(opts: BuildOptions, specs: Sequence[InputSpec], total: Stats, tok_size: int, dtype,
                  content_hash: str, n_bad: int, quarantine_path: Optional[str]) -> Dict[str, Any]:
    vocab = opts.vocab
    vd = vocab.to_dict()
    bpe = None
    if opts.bpe_model:
        from data_tools.bpe import UnitBPE
        m = UnitBPE.load(opts.bpe_model)
        # the token vocabulary the model sees: BPE pieces after the specials
        vd = type(vocab)(codebook_size=m.size, languages=vocab.languages, lang_tags=vocab.lang_tags,
                         sentence_sep=vocab.sentence_sep, dedup=vocab.dedup).to_dict()
        bpe = {"model": os.path.abspath(opts.bpe_model), "pieces": m.size,
               "unit_codebook_size": vocab.codebook_size, "unit_char_base": m.char_base}
    langs = {l: total.per_language.get(l, 0) for l in vocab.languages}
    langs["none"] = total.per_language.get("none", 0)
    fr = float(opts.frame_rate)
    return {
        "version": MANIFEST_VERSION,
        "vocab": vd,
        "token_vocab_size": tok_size,
        "dtype": np.dtype(dtype).name,
        "mode": opts.mode,
        "p": opts.p if opts.mode in RANDOM_MODES else None,
        "seed": opts.seed,
        "story_languages": list(opts.story_langs),
        "mono_language": opts.lang if opts.mode == "mono" else None,
        "target_length": opts.target_length,
        "add_bos": opts.add_bos,
        "source": {"name": opts.source_type, "frame_rate": fr},
        "tokens": {"total": total.tokens, "per_language": langs, "per_source": dict(total.per_source)},
        "units_in": total.units_in,
        "documents": total.documents,
        "sentences": total.sentences,
        "sentence_boundaries": total.boundaries,
        "language_switches": total.switches,
        "hours": {l: total.frames.get(l, 0) / fr / 3600.0 for l in vocab.languages},
        "content_hash": content_hash,
        "bpe": bpe,
        "quarantine": {"count": n_bad, "report": quarantine_path},
        "inputs": [{"path": os.path.abspath(s.path), "source": s.source} for s in specs],
        "lang_channel": LANG_SUFFIX,
    }
