"""The build pipeline: inputs -> (worker chunks) -> one megatron-core indexed dataset + language channel.

Streaming: the main process cuts the inputs into chunks of lines (``formats.iter_chunks``) and hands them to
workers (at most 2 chunks per worker in flight). A worker turns a chunk into one token array, one language
array and the document lengths: utterance chunks through the vectorised path (``data_tools.fast``), stories,
BPE and anything unusual record by record (``streams.record_documents``), with the same bytes either way.
The main process appends the arrays in input order to ``<prefix>.tmp-<pid>/final.bin`` (hashing as it
writes) and writes the .idx with megatron-core's index writer. Everything is moved into place at the end,
manifest last.
"""
from __future__ import annotations

import collections
import io
import json
import mmap
import multiprocessing
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence, Set, Union

import numpy as np

from megaslm.vocab import CONTENT_HASH, LANG_SUFFIX, MANIFEST_VERSION, content_hasher, lang_prefix, manifest_path

from data_tools import fast
from data_tools.common import keep_freed_memory, token_dtype, write_index
from data_tools.errors import DataError
from data_tools.formats import InputSpec, bounds_path, check_inputs, chunk_items, iter_chunks, parse_item
from data_tools.streams import RANDOM_MODES, BuildOptions, Encoder, Stats, record_documents, story_rng

_CTX: Dict[str, Any] = {}


def _init_worker(ctx: Dict[str, Any]) -> None:
    _CTX.clear()
    _CTX.update(ctx)
    _CTX["encoder"] = Encoder(ctx["opts"].vocab, ctx["opts"].bpe_model)


def _init_pool_worker(ctx: Dict[str, Any]) -> None:
    keep_freed_memory()         # a pool worker is our process (see common.keep_freed_memory)
    _init_worker(ctx)


def _fast_chunk(spec: InputSpec, chunk, opts: BuildOptions, dtype):
    """The vectorised conversion of an utterance chunk, or None (then the record path decides)."""
    if opts.bpe_model or not _CTX.get("fast", True):
        return None
    _, first, payload = chunk
    try:
        if spec.kind == "npz":
            return fast.npz_chunk(spec.path, first, payload, spec.source, opts, dtype)
        if spec.kind == "npy":
            return fast.npy_chunk(spec.path, payload, spec.source, opts, dtype)
        return fast.jsonl_chunk(payload, spec.source, opts, dtype)
    except (DataError, ValueError, TypeError, KeyError, IndexError):
        return None             # e.g. an unreadable .npy: the record path reports it where it belongs


def _read_range(chunk):
    """A chunk shipped as (input, first line, (byte offset, byte count, line count)) -> the usual chunk with
    its lines, read here in the worker (the parent does not pickle the text to every worker)."""
    fi, first, (offset, nbytes, nlines) = chunk
    spec = _CTX["inputs"][fi]
    path = bounds_path(spec.path) if spec.kind == "npy" else spec.path
    with open(path, "rb") as f:
        f.seek(offset)
        lines = io.BytesIO(f.read(nbytes)).readlines()   # splits on b"\n" only, like iterating the file
    if len(lines) != nlines:
        raise DataError("input changed while building", path=path)
    return fi, first, lines


def _pool_chunk(job) -> Dict[str, Any]:
    """A pool worker's task: the chunk's lines are read here, and its tokens and languages go to a file in
    the build's temporary directory (the parent appends it to the output with an in-kernel copy and hashes
    it through a memory map) instead of being pickled back through a pipe."""
    index, chunk = job
    if isinstance(chunk[2], tuple):
        chunk = _read_range(chunk)
    res = _process_chunk((index, chunk))
    if res["lengths"].size:
        path = os.path.join(_CTX["tmpdir"], f"chunk-{index}.bin")
        with open(path, "wb", buffering=0) as f:
            f.write(res["tokens"])
            f.write(res["langs"])
        res["file"] = (path, res["tokens"].nbytes, res["langs"].nbytes)
        del res["tokens"], res["langs"]
    return res


def _process_chunk(job) -> Dict[str, Any]:
    """Parse, validate and convert one chunk. Runs in a worker."""
    index, chunk = job
    opts: BuildOptions = _CTX["opts"]
    inputs: List[InputSpec] = _CTX["inputs"]
    dtype = _CTX["dtype"]
    fi = chunk[0]
    spec = inputs[fi]
    res = _fast_chunk(spec, chunk, opts, dtype)
    if res is not None:
        tokens, langs, lengths, stats, unknown = res
        return {"tokens": tokens, "langs": langs, "lengths": lengths, "stats": stats, "bad": [],
                "unknown": {fi: unknown} if unknown else {}}
    vocab = opts.vocab
    stats, bad = Stats(), []
    docs_out = []
    unknown: Set[str] = set()
    for fi, line, text in chunk_items(chunk):
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
        unknown.update(rec.unknown)
        stats.add(st)
        docs_out.extend(docs)
    if docs_out:
        tokens = np.concatenate([ids for ids, _ in docs_out]).astype(dtype)
        langs = np.concatenate([lid for _, lid in docs_out]).astype(np.uint8)
        lengths = np.array([ids.size for ids, _ in docs_out], dtype=np.int64)
    else:
        tokens, langs, lengths = np.zeros(0, dtype), np.zeros(0, np.uint8), np.zeros(0, np.int64)
    return {"tokens": tokens, "langs": langs, "lengths": lengths, "stats": stats, "bad": bad,
            "unknown": {fi: unknown} if unknown else {}}


def _progress(opts: BuildOptions, desc: str):
    from tqdm import tqdm
    return tqdm(desc=desc, unit="rec", disable=not (opts.progress and sys.stderr.isatty()), file=sys.stderr)


def _chunk_len(chunk) -> int:
    payload = chunk[2]
    return payload if isinstance(payload, int) else len(payload)


def _pool_context():
    """fork, unless this process already holds torch (a caller that trained, or a second build in one
    process: the index writer imports megatron-core): forking that costs ~0.1 s per worker, so the workers
    then come from a fork server that holds only data_tools."""
    if "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data_tools.build"])
    return ctx


def _run_chunks(jobs, opts: BuildOptions, ctx: Dict[str, Any]):
    """Yield chunk results in input order, with at most 2 chunks per worker in flight."""
    if opts.workers == 1:
        _init_worker(ctx)
        for job in jobs:
            yield _process_chunk(job), _chunk_len(job[1])
        return
    pool = _pool_context().Pool(opts.workers, initializer=_init_pool_worker, initargs=(ctx,))
    offsets: Dict[int, int] = {}
    try:
        pending = collections.deque()
        for index, chunk in jobs:
            n = _chunk_len(chunk)
            fi, first, payload = chunk
            if not isinstance(payload, int):         # lines: ship their byte range, not their text
                nbytes = sum(map(len, payload))
                off = offsets.get(fi, 0)
                offsets[fi] = off + nbytes
                chunk = (fi, first, (off, nbytes, len(payload)))
            pending.append((pool.apply_async(_pool_chunk, ((index, chunk),)), n))
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


def _append_chunk_file(file, tf, lf, h) -> None:
    """A worker's chunk file (tokens, then languages) -> appended to the two outputs with an in-kernel copy
    where the OS has one; the tokens are hashed through a memory map (no copy)."""
    path, tok_bytes, lang_bytes = file
    with open(path, "rb") as f:
        if tok_bytes:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as mv:
                with mv[:tok_bytes] as toks:
                    h.update(toks)
        for out, off, count in ((tf, 0, tok_bytes), (lf, tok_bytes, lang_bytes)):
            out.flush()                              # the copy writes at the file descriptor's position
            while count:
                try:
                    done = os.copy_file_range(f.fileno(), out.fileno(), count, off)
                except (AttributeError, OSError):
                    f.seek(off)
                    done = out.write(f.read(count))
                if not done:
                    raise DataError("short copy of a worker's chunk", path=path)
                off += done
                count -= done
    os.remove(path)


def _fast_enabled() -> bool:
    """``DATA_TOOLS_RECORD_PATH=1`` forces the record-by-record path (tests compare both paths' bytes)."""
    return os.environ.get("DATA_TOOLS_RECORD_PATH", "") in ("", "0")


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
    tmpdir = f"{output_prefix}.tmp-{os.getpid()}"
    try:
        os.makedirs(out_dir, exist_ok=True)
        shutil.rmtree(tmpdir, ignore_errors=True)
        os.makedirs(tmpdir)
    except OSError as e:
        raise DataError(f"cannot create the output here ({e.strerror or e}); expected a writable "
                        f"directory for the prefix", path=output_prefix) from None
    try:
        tok_size = vocab_size_of(opts)
        dtype = token_dtype(tok_size)
        ctx = {"opts": opts, "inputs": specs, "tmpdir": tmpdir, "dtype": dtype, "fast": _fast_enabled()}
        jobs = enumerate(iter_chunks(specs, opts.chunk_size))
        total, bad, lengths = Stats(), [], []
        unknown: Dict[int, Set[str]] = {}
        final = os.path.join(tmpdir, "final")
        h = content_hasher(CONTENT_HASH)
        results = _run_chunks(jobs, opts, ctx)
        try:
            with _progress(opts, f"build {os.path.basename(output_prefix)}") as bar, \
                    open(final + ".bin", "wb") as tf, open(lang_prefix(final) + ".bin", "wb") as lf:
                for res, n in results:
                    total.add(res["stats"])
                    bad.extend(res["bad"])
                    for fi, names in res["unknown"].items():
                        unknown.setdefault(fi, set()).update(names)
                    if "file" in res:
                        _append_chunk_file(res["file"], tf, lf, h)
                        lengths.append(res["lengths"])
                    elif res["lengths"].size:
                        tf.write(res["tokens"])
                        h.update(res["tokens"])
                        lf.write(res["langs"])
                        lengths.append(res["lengths"])
                    bar.update(n)
        finally:
            results.close()     # on error: terminate and join the workers before removing the temps
        if total.documents == 0:
            raise DataError("no valid records: refusing to write an empty dataset"
                            + (f" ({len(bad)} quarantined)" if bad else ""), path=specs[0].path)
        lengths = np.concatenate(lengths)
        write_index(final + ".idx", dtype, lengths)
        write_index(lang_prefix(final) + ".idx", np.uint8, lengths)
        with open(lang_prefix(final) + ".bin", "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        ignored = {specs[fi].path: sorted(names) for fi, names in sorted(unknown.items())}
        for path, names in ignored.items():
            print(f"warning: {path}: unknown field(s) {names} ignored (data_tools reads only the fields in "
                  f"docs/data_tools.md)", file=sys.stderr)

        quarantine_path = None
        if bad:
            quarantine_path = output_prefix + ".quarantine.jsonl"
            with open(os.path.join(tmpdir, "quarantine.jsonl"), "w") as f:
                for b in bad:
                    f.write(json.dumps(b) + "\n")

        manifest = make_manifest(opts, specs, total, tok_size, dtype, h.hexdigest(), len(bad), quarantine_path,
                                 ignored)
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
                  content_hash: str, n_bad: int, quarantine_path: Optional[str],
                  ignored_fields: Optional[Dict[str, List[str]]] = None) -> Dict[str, Any]:
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
        "content_hash_algorithm": CONTENT_HASH,
        "bpe": bpe,
        "quarantine": {"count": n_bad, "report": quarantine_path},
        "ignored_fields": ignored_fields or {},
        "inputs": [{"path": os.path.abspath(s.path), "source": s.source} for s in specs],
        "lang_channel": LANG_SUFFIX,
    }
