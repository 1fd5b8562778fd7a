"""The build: inputs -> (chunks) -> one megatron-core indexed dataset + language channel + manifest.

Streaming: the inputs are cut into chunks (``formats.iter_chunk_ranges``: a line file by size, about
``chunk_size`` lines each, given as byte ranges; an .npz by record counts). A chunk is read where it is
converted (``_read_range``: one ``pread`` into a ``formats.LineText``) and becomes one token array, one
language array and the document lengths (``_process_chunk``): utterance chunks through the vectorised path
(``data_tools.fast``), stories, BPE and anything unusual record by record (``streams.record_documents``), with
the same bytes either way. ``data_tools.engine`` runs the chunks (here, in converter threads or in worker
processes: ``uses_processes``) and writes their arrays into ``<prefix>.tmp-<pid>/final.bin`` in input order,
hashing them; this module adds up their results (``_Output``), checks what needs every chunk, writes the .idx
(megatron-core's layout: ``common.write_index``) and the manifest, and moves everything into place at the end,
manifest last (``common.commit_dataset``).
"""
from __future__ import annotations

import collections
import contextlib
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence, Set, Union

import numpy as np

from megaslm.progress import Progress
from megaslm.vocab import CONTENT_HASH, LANG_SUFFIX, MANIFEST_VERSION, content_hasher, lang_prefix

from data_tools import arrow_inputs, fast
from data_tools.common import commit_dataset, staging_dir, token_dtype, write_index_blocks, writing
from data_tools.engine import CTX, Lengths, Quarantine, Writer, hash_file, run_chunks
from data_tools.errors import DataError, FileError
from data_tools.arrays import clear_caches, load_npz, npy_units
from data_tools.formats import (BINARY_CHUNK_FACTOR, BoundsCursor, InputSpec, LineText, bounds_path, check_inputs,
                                chunk_items, covers_to_end, follows, iter_chunk_ranges, parse_item)
from data_tools.interleave import check_held, design_of, manifest_entry
from data_tools.streams import RANDOM_MODES, BuildOptions, Encoder, Stats, record_documents, story_rng

# One process: chunks of .npy/.npz inputs hold this many times ``chunk_size`` records. Measured on the
# benchmark's input (python -m data_tools.bench_build; 2-core Xeon): 4x is ~10% faster than 1x on .npy
# (fewer per-chunk NumPy calls and sidecar layouts to check) and no slower on .npz; 16x (a pool's
# formats.BINARY_CHUNK_FACTOR) is slower there, its 3.7M-unit chunks no longer fit the core's cache.
LOCAL_BINARY_CHUNK_FACTOR = 4


def _setup_converter() -> None:
    """The converting process's encoder (units -> tokens, through unit BPE when a model is given): run once
    per process by ``engine.init_worker``."""
    CTX["encoder"] = Encoder(CTX["opts"].vocab, CTX["opts"].bpe_model)


def _fast_chunk(spec: InputSpec, chunk, opts: BuildOptions, dtype):
    """The vectorised conversion of an utterance chunk, or None (then the record path decides)."""
    if opts.bpe_model or not CTX.get("fast", True):
        return None
    _, first, payload = chunk
    try:
        if spec.kind == "npz":
            return fast.npz_chunk(spec.path, first, payload, spec.source, opts, dtype)
        if spec.kind == "npy":
            return fast.npy_chunk(spec.path, payload, spec.source, opts, dtype)
        if spec.kind == "table":
            return fast.arrow_chunk(spec, first, payload, opts, dtype)
        return fast.jsonl_chunk(payload, spec.source, opts, dtype)
    except (DataError, ValueError, TypeError, KeyError, IndexError):
        return None             # e.g. an unreadable .npy: the record path reports it where it belongs


def _read_range(chunk):
    """A chunk given as (input, first line, (byte offset, byte count, line count)) -> the chunk with its
    lines as one ``LineText``, read here, where it is converted (a pool worker: the parent does not pickle
    the text to every worker)."""
    fi, first, (offset, nbytes, nlines) = chunk
    spec = CTX["inputs"][fi]
    path = bounds_path(spec.path) if spec.kind == "npy" else spec.path
    try:
        with open(path, "rb", buffering=0) as f:
            text = os.pread(f.fileno(), nbytes, offset)
            if len(text) < nbytes:      # one read returns at most ~2 GiB (Linux): read on, to the end of file
                parts, got = [text], len(text)
                while got < nbytes:
                    more = os.pread(f.fileno(), nbytes - got, offset + got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                text = b"".join(parts)
    except OSError as e:
        raise DataError(f"cannot read ({e.strerror or e})", path=path) from None
    # the lines counted again (NumPy: ~3x faster than bytes.count): a file changed since it was cut shows here
    if len(text) != nbytes or int(np.count_nonzero(np.frombuffer(text, np.uint8) == 10)) + (
            0 if text.endswith(b"\n") else 1) != nlines:
        raise DataError(f"input changed while building: bytes {offset}-{offset + nbytes} no longer hold the "
                        f"{nlines} lines they held when the build cut the file; expected it unchanged until the "
                        f"build ends", path=path)
    return fi, first, LineText(text, nlines)



def _process_chunk(job) -> Dict[str, Any]:
    """Parse, validate and convert one chunk (``engine`` runs it in a worker): the vectorised path when it
    can vouch for the chunk, else record by record."""
    index, chunk = job
    if isinstance(chunk[2], tuple):
        chunk = _read_range(chunk)
    opts: BuildOptions = CTX["opts"]
    fi = chunk[0]
    spec: InputSpec = CTX["inputs"][fi]
    res = _fast_chunk(spec, chunk, opts, CTX["dtype"])
    if res is None:
        return _record_chunk(spec, chunk, opts, CTX["dtype"])
    tokens, langs, lengths, stats, unknown = res[:5]
    out = {"tokens": tokens, "langs": langs, "lengths": lengths, "stats": stats, "bad": [],
           "unknown": {fi: unknown} if unknown else {}}
    if spec.kind == "npy":          # the chunk's first start and last end, for the build to check (span)
        first, last = _record_lines(chunk)
        out["span"] = (fi, first, res[5][0], last, res[5][1])
    return out


def _record_chunk(spec: InputSpec, chunk, opts: BuildOptions, dtype) -> Dict[str, Any]:
    """``_process_chunk`` record by record: the exact error (file:line:field) or quarantine entry."""
    vocab = opts.vocab
    stats, bad = Stats(), []
    docs_out = []
    unknown: Set[str] = set()
    partial = design_of(opts) != "pair"     # --langs / --pairs: a story may hold a subset of the languages
    cursor = BoundsCursor(spec.path, opts.allow_gaps) if spec.kind == "npy" else None
    fi = chunk[0]
    for fi, line, text in chunk_items(chunk):
        try:
            rec = parse_item(spec, line, text, vocab.codebook_size, vocab.languages, opts.story_langs, opts.lang,
                             bounds=cursor, partial=partial)
            st = Stats()
            docs = record_documents(rec, spec.source, opts, CTX["encoder"],
                                    story_rng(opts.seed, fi, line) if rec.kind == "story" else None, st)
        except DataError as e:
            if e.path is None:      # errors raised without a location: add it
                e = DataError(e.reason, path=spec.path, line=line, field=e.field)
            if not opts.skip_bad or isinstance(e, FileError):
                raise e
            if cursor is not None:
                cursor.skipped(line)
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
    out = {"tokens": tokens, "langs": langs, "lengths": lengths, "stats": stats, "bad": bad,
           "unknown": {fi: unknown} if unknown else {}}
    span = None if cursor is None else cursor.span()
    if span is not None:
        out["span"] = (chunk[0],) + span
    return out


_BLANK = frozenset(b" \t\n\r\x0b\x0c")     # what bytes.strip() strips: chunk_items skips such lines


def _record_lines(chunk):
    """The line numbers of a line chunk's first and last records (non-blank lines), found from the ends of
    its text: no pass over the whole chunk."""
    _, first, payload = chunk
    if not isinstance(payload, LineText):
        lines = [i for i, t in enumerate(payload) if t.strip()]
        return first + lines[0], first + lines[-1]
    text = payload.text
    i, j = 0, len(text)
    while i < j and text[i] in _BLANK:
        i += 1
    while j > i and text[j - 1] in _BLANK:
        j -= 1
    newlines = payload.count - (0 if text.endswith(b"\n") else 1)
    return first + text.count(b"\n", 0, i), first + newlines - text.count(b"\n", j)


def _check_spans(specs: Sequence[InputSpec], res: Dict[str, Any], ends: Dict[int, tuple], opts: BuildOptions):
    """An .npy chunk's first range must start where the input's previous chunk's last range ended (0 for
    its first chunk): the chunks were converted apart, maybe at once. ``ends``: input -> (line, end)."""
    span = res.get("span")
    if span is None:
        return
    fi, first_line, first_start, last_line, last_end = span
    prev_end = ends.get(fi, (None, 0))[1]
    if first_start is not None and prev_end is not None:
        follows(bounds_path(specs[fi].path), first_line, first_start, prev_end, specs[fi].path, opts.allow_gaps)
    ends[fi] = (last_line, last_end)


def _check_ends(specs: Sequence[InputSpec], ends: Dict[int, tuple], opts: BuildOptions) -> None:
    """Every .npy's records must reach its last unit (unless --allow-gaps)."""
    if opts.allow_gaps:
        return
    for fi, spec in enumerate(specs):
        if spec.kind != "npy":
            continue
        line, end = ends.get(fi, (None, None))
        units = npy_units(spec.path)
        if (line is None and units) or (line is not None and end is not None):
            covers_to_end(bounds_path(spec.path), line, end, units, spec.path)


class _InputBytes:
    """The build's progress in bytes of its inputs (their size on disk, known before the first chunk):
    ``jobs`` passes the chunks through, noting where in the inputs each one ends (a line chunk: its byte
    range's end in its file; rows of an .npz or a table: their share of its rows); ``advance`` gives the
    bytes of the next chunk done (results come back in input order, however many run ahead)."""

    def __init__(self, specs: Sequence[InputSpec]):
        self.specs = specs
        self.sizes = [_size_on_disk(s) for s in specs]
        self.before = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.ends: "collections.deque[int]" = collections.deque()
        self.done = 0

    @property
    def total(self) -> int:
        return self.before[-1]

    def jobs(self, jobs):
        for job in jobs:
            fi, first, payload = job[1]
            self.ends.append(self.before[fi] + int(self.sizes[fi] * self._fraction(fi, first, payload)))
            yield job

    def _fraction(self, fi: int, first: int, payload) -> float:
        spec = self.specs[fi]
        if isinstance(payload, tuple):       # (byte offset, byte count, lines) of the line file
            lines = bounds_path(spec.path) if spec.kind == "npy" else spec.path
            return (payload[0] + payload[1]) / max(1, os.path.getsize(lines))
        if isinstance(payload, int):         # rows of an .npz or a table
            rows = len(load_npz(spec.path)["offsets"]) - 1 if spec.kind == "npz" else \
                arrow_inputs.load(spec.path, spec.table).rows
            return (first - 1 + payload) / max(1, rows)
        return 1.0

    def advance(self) -> int:
        end = self.ends.popleft()
        n, self.done = end - self.done, end
        return n


def _size_on_disk(spec: InputSpec) -> int:
    """Bytes of an input: the file (an .npy with its bounds sidecar), or every file of a save_to_disk folder."""
    if os.path.isdir(spec.path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(spec.path) for f in fs)
    extra = bounds_path(spec.path) if spec.kind == "npy" and os.path.isfile(bounds_path(spec.path)) else None
    return os.path.getsize(spec.path) + (os.path.getsize(extra) if extra else 0)


def uses_processes(specs: Sequence[InputSpec], opts: BuildOptions) -> bool:
    """Whether ``--workers N`` converts in N processes (a pool) rather than N threads of this process.

    Threads when every input is an .npy or .npz and no BPE model is given: their chunks are converted by a
    few whole-array NumPy calls, which release the GIL, so N threads convert N chunks at once -- and share
    this process's heap, its populated input maps and its writer thread, which appends and hashes the
    chunks in order while they convert. A pool paid for each of those again in every worker: fresh heaps
    and input maps faulted in page by page (perf stat over five builds of the 10x .npz: 88k page faults
    with 2 workers, 12k with one), writes of two processes into one file serialised by the file system,
    and the parent's final re-read of the output to hash it; on the 2-core benchmark machine 2 worker
    processes were slower than one process on these inputs (0.72-0.78x). Any line input (JSONL utterances
    or stories) or a BPE model means processes: those are parsed with Python-level steps per line or
    record, which hold the GIL (2 threads measured 1.0x on the benchmark's JSONL)."""
    return opts.workers > 1 and (bool(opts.bpe_model) or any(s.kind not in ("npy", "npz", "table") for s in specs))




def _write_indexes(final: str, dtype, lengths: Lengths) -> None:
    """The .idx of the tokens and of the language channel (the same documents) for the chunks' lengths."""
    for path, dt in ((final + ".idx", dtype), (lang_prefix(final) + ".idx", np.uint8)):
        with writing(path):
            write_index_blocks(path, dt, lengths.count, lengths.blocks)


def _close(f) -> None:
    """Close an output file: its last buffered bytes are written here (and may not fit)."""
    with writing(f.name):
        f.close()


def _fast_enabled() -> bool:
    """``DATA_TOOLS_RECORD_PATH=1`` forces the record-by-record path (tests compare both paths' bytes)."""
    return os.environ.get("DATA_TOOLS_RECORD_PATH", "") in ("", "0")


def vocab_size_of(opts: BuildOptions) -> int:
    if opts.bpe_model:
        from data_tools.bpe import UnitBPE
        return opts.vocab.offset + UnitBPE.load(opts.bpe_model).size
    return opts.vocab.size



class _Output:
    """A build's output in its temporary directory, as the chunks' results come in (in input order): the
    token and language files (``final``), the documents' lengths, the quarantine, the totals and the content
    hash."""

    def __init__(self, tmpdir: str, dtype):
        self.final, self.dtype = os.path.join(tmpdir, "final"), dtype
        self.paths = (self.final + ".bin", lang_prefix(self.final) + ".bin")
        self.total = Stats()
        self.lengths = Lengths(os.path.join(tmpdir, "lengths.i64"))
        self.bad = Quarantine(os.path.join(tmpdir, "quarantine.jsonl"))
        self.ends: Dict[int, tuple] = {}        # .npy inputs: (line, end) of the last record's range so far
        self.unknown: Dict[int, Set[str]] = {}
        self.hash = content_hasher(CONTENT_HASH)
        self.placed = 0              # tokens the pool workers wrote into the outputs themselves

    def add(self, res: Dict[str, Any], specs: Sequence[InputSpec], opts: BuildOptions, writer) -> None:
        _check_spans(specs, res, self.ends, opts)
        self.total.add(res["stats"])
        self.bad.add(res["bad"])
        for fi, names in res["unknown"].items():
            self.unknown.setdefault(fi, set()).update(names)
        if res["lengths"].size:
            self.lengths.add(res["lengths"])
        if "placed" in res:
            self.placed += res["placed"]
        elif res["lengths"].size:
            writer.put(res["tokens"], res["langs"])


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
    tmpdir = staging_dir(output_prefix)
    out = None
    try:
        tok_size = vocab_size_of(opts)
        out = _Output(tmpdir, token_dtype(tok_size))
        indexed = _convert_chunks(specs, opts, out, os.path.basename(output_prefix))
        _finish(specs, opts, out, indexed)
        ignored = _warn_ignored(specs, out.unknown)
        quarantine = output_prefix + ".quarantine.jsonl"
        manifest = make_manifest(opts, specs, out.total, tok_size, out.dtype, out.hash.hexdigest(), out.bad.count,
                                 quarantine if out.bad.count else None, ignored)
        if out.bad.count:
            commit_dataset(out.final, output_prefix, manifest, extra=[(out.bad.path, quarantine)])
        else:
            commit_dataset(out.final, output_prefix, manifest, stale=[quarantine])
        return manifest
    finally:
        clear_caches()
        arrow_inputs.clear_cache()
        if out is not None:
            out.lengths.close()
        shutil.rmtree(tmpdir, ignore_errors=True)


def _convert_chunks(specs: Sequence[InputSpec], opts: BuildOptions, out: _Output, name: str) -> bool:
    """Every chunk converted and written into ``out`` (``engine.run_chunks``): by the pool workers themselves,
    or by a writer thread here, which then also writes the .idx files while it writes the last chunk.
    Returns whether the .idx files were written."""
    processes = uses_processes(specs, opts)
    ctx = {"opts": opts, "inputs": specs, "dtype": out.dtype, "fast": _fast_enabled(), "outputs": out.paths,
           "convert": _process_chunk, "setup": _setup_converter}
    where = _InputBytes(specs)
    jobs = where.jobs(enumerate(iter_chunk_ranges(specs, opts.chunk_size,
                                                  BINARY_CHUNK_FACTOR if processes else LOCAL_BINARY_CHUNK_FACTOR,
                                                  opts.max_line_bytes)))
    with writing(out.paths[0]):
        tf = open(out.paths[0], "wb")
    try:
        with writing(out.paths[1]):
            lf = open(out.paths[1], "wb")
    except BaseException:
        tf.close()
        raise
    results = writer = None
    try:
        results = run_chunks(jobs, opts.workers, ctx, processes)
        writer = None if processes else Writer(tf, lf, out.hash)
        with Progress(f"build {name}", total=where.total, unit="B", enabled=opts.progress) as bar:
            for res, _ in results:
                out.add(res, specs, opts, writer)
                bar.update(where.advance())
        if writer is not None:
            if out.total.documents:     # the .idx files while the thread writes the last chunk
                _write_indexes(out.final, out.dtype, out.lengths)
            writer.close()
        _close(tf)
        _close(lf)
        out.bad.close()
    finally:
        if writer is not None:
            writer.close(check=False)   # on error: the thread ends before the temps are removed
        if results is not None:
            results.close()     # on error: terminate and join the workers before removing the temps
        for f in (tf, lf, out.bad.file):    # on error (closed already otherwise)
            if f is not None and not f.closed:
                with contextlib.suppress(OSError):
                    f.close()
    return writer is not None


def _finish(specs: Sequence[InputSpec], opts: BuildOptions, out: _Output, indexed: bool) -> None:
    """After the last chunk: the checks that need every chunk, the .idx files (unless written already) and
    the rest of the content hash."""
    _check_ends(specs, out.ends, opts)
    if out.total.documents == 0:
        raise DataError("no valid records: refusing to write an empty dataset"
                        + (f" ({out.bad.count} quarantined)" if out.bad.count else ""), path=specs[0].path)
    check_held(opts, out.total.tally)
    if out.placed and os.path.getsize(out.paths[0]) != out.placed * np.dtype(out.dtype).itemsize:
        raise DataError(f"the workers wrote {os.path.getsize(out.paths[0])} bytes, expected {out.placed} tokens",
                        path=out.paths[0])
    if not indexed:
        _write_indexes(out.final, out.dtype, out.lengths)
    out.lengths.close()
    for path in (out.paths if out.placed else out.paths[1:]):   # the writer thread hashed its tokens as it wrote
        hash_file(out.hash, path)


def _warn_ignored(specs: Sequence[InputSpec], unknown: Dict[int, Set[str]]) -> Dict[str, List[str]]:
    """The unknown fields of each input, each input warned about once: {path: sorted names}."""
    ignored = {specs[fi].path: sorted(names) for fi, names in sorted(unknown.items())}
    for path, names in ignored.items():
        print(f"warning: {path}: unknown field(s) {names} ignored (data_tools reads only the fields in "
              f"docs/data_tools.md)", file=sys.stderr)
    return ignored


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
        "p": opts.p if opts.mode in RANDOM_MODES and not opts.langs else None,   # --langs: "interleave" probs
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
        "interleave": manifest_entry(opts, total),
        "hours": {l: total.frames.get(l, 0) / fr / 3600.0 for l in vocab.languages},
        "content_hash": content_hash,
        "content_hash_algorithm": CONTENT_HASH,
        "bpe": bpe,
        "quarantine": {"count": n_bad, "report": quarantine_path},
        "ignored_fields": ignored_fields or {},
        "inputs": [{"path": os.path.abspath(s.path), "source": s.source} for s in specs],
        "lang_channel": LANG_SUFFIX,
    }
