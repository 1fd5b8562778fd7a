"""The build pipeline: inputs -> (worker chunks) -> one megatron-core indexed dataset + language channel.

Streaming: the inputs are cut into chunks (``formats.iter_chunk_ranges``: a line file by size, about
``chunk_size`` lines each, given as byte ranges; an .npz by record counts). A chunk is read where it is
converted (``_read_range``: one ``pread`` into a ``formats.LineText``) and becomes one token array, one
language array and the document lengths: utterance chunks through the vectorised path (``data_tools.fast``),
stories, BPE and anything unusual record by record (``streams.record_documents``), with the same bytes either
way. With one worker the main process converts every chunk and a thread (``_Writer``) appends the arrays to
``<prefix>.tmp-<pid>/final.bin`` (hashing as it writes) while the next chunk is converted. ``--workers N``
(``uses_processes``): over .npy/.npz inputs, N threads of this process convert the chunks (whole-array
NumPy calls, which release the GIL) and the same writer thread appends them in order; over line inputs, N
worker processes (``_Workers``) take the chunks from one task pipe (at most IN_FLIGHT chunks per worker in
flight), read them, and write their arrays into the final files themselves, at the offset the workers agree
on (``_OffsetChain``); the main process reorders their answers and hashes the files at the end. The .idx
has megatron-core's layout (``common.write_index``). Everything is moved into place at the end, manifest
last.
"""
from __future__ import annotations

import collections
import contextlib
import json
import mmap
import multiprocessing
import os
import queue
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Set, Union

import numpy as np

from megaslm.vocab import CONTENT_HASH, LANG_SUFFIX, MANIFEST_VERSION, content_hasher, lang_prefix, manifest_path

from data_tools import fast
from data_tools.common import (INDEX_BLOCK, commit_files, keep_freed_memory, token_dtype, write_error,
                               write_index_blocks, writing)
from data_tools.errors import DataError, FileError
from data_tools.formats import (BINARY_CHUNK_FACTOR, BoundsCursor, InputSpec, LineText, bounds_path, check_inputs,
                                chunk_items, clear_caches, covers_to_end, follows, iter_chunk_ranges, npy_units,
                                parse_item)
from data_tools.streams import RANDOM_MODES, BuildOptions, Encoder, Stats, record_documents, story_rng

_CTX: Dict[str, Any] = {}
# One process: chunks of .npy/.npz inputs hold this many times ``chunk_size`` records. Measured on the
# benchmark's input (python -m data_tools.bench_build; 2-core Xeon): 4x is ~10% faster than 1x on .npy
# (fewer per-chunk NumPy calls and sidecar layouts to check) and no slower on .npz; 16x (a pool's
# formats.BINARY_CHUNK_FACTOR) is slower there, its 3.7M-unit chunks no longer fit the core's cache.
LOCAL_BINARY_CHUNK_FACTOR = 4
# Chunks handed to each pool worker ahead of the results the parent is waiting for: with 2, a worker sat
# idle whenever the parent was late to collect (the parent shares the cores with the workers).
IN_FLIGHT = 4
# Converter threads (.npy/.npz, ``uses_processes``): chunks per thread ahead of the one the writer waits for.
# 2 is as fast as 4 on the benchmark's 10x .npz (109-112 ms with 2 threads, 123-125 ms with 4, either way) and
# holds half the converted chunks in memory.
THREAD_IN_FLIGHT = 2


def _init_worker(ctx: Dict[str, Any]) -> None:
    _CTX.clear()
    _CTX.update(ctx)
    _CTX["encoder"] = Encoder(ctx["opts"].vocab, ctx["opts"].bpe_model)


def _init_pool_worker(ctx: Dict[str, Any]) -> None:
    keep_freed_memory()         # a pool worker is our process (see common.keep_freed_memory)
    _init_worker(ctx)
    _CTX["fds"] = tuple(os.open(p, os.O_WRONLY) for p in ctx["outputs"])


class _OffsetChain:
    """Where each chunk's tokens start in the output, agreed between the pool workers themselves: chunk k
    starts where chunk k-1 ends, and chunk k-1's worker publishes that end as soon as it has converted its
    chunk, before it writes. So a worker waits only for the previous chunk's conversion (which started
    before its own), and the workers write their chunks into the final files at the same time -- no chunk
    is written twice or copied by the parent. A ring of (chunk index, end) slots in shared memory, more
    slots than chunks in flight (see ``_run_chunks``); an end of -1 marks a chunk that failed, so that the
    chunks after it stop instead of waiting (the parent raises the failed chunk's own error)."""

    def __init__(self, mp, workers: int):
        self.slots = IN_FLIGHT * workers + 4
        self.arr = mp.Array("q", [-1, 0] * self.slots, lock=False)
        self.cond = mp.Condition()

    def start_of(self, k: int) -> int:
        if k == 0:
            return 0
        s = 2 * ((k - 1) % self.slots)
        with self.cond:
            while self.arr[s] != k - 1:
                self.cond.wait(timeout=1.0)
            return self.arr[s + 1]

    def publish(self, k: int, end: int) -> None:
        s = 2 * (k % self.slots)
        with self.cond:
            self.arr[s + 1] = end
            self.arr[s] = k
            self.cond.notify_all()


def _write_error(e: OSError, path: str) -> DataError:
    """A failed write of the dataset (disk full, a file size limit...) as one line naming the file (and the
    file system, when full): ``common.write_error``."""
    return write_error(e, path)


class _Writer:
    """One process's build writes (and hashes) its chunks in a thread, in order, while it converts the
    next chunk: the page-cache copy of a chunk's tokens and languages (~15% of a .npy build) then overlaps
    NumPy's work instead of following it. At most 2 chunks wait (bounded memory). A write error (disk full)
    is raised in the building thread, at the next chunk or at ``close``."""

    def __init__(self, tf, lf, h):
        self.q: "queue.Queue" = queue.Queue(maxsize=2)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(tf, lf, h), name="data_tools-writer", daemon=True)
        self.thread.start()

    def _run(self, tf, lf, h) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None:
                f = tf
                try:
                    tf.write(item[0])
                    h.update(item[0])
                    f = lf
                    lf.write(item[1])
                except OSError as e:
                    self.error = _write_error(e, f.name)
                except BaseException as e:   # noqa: BLE001 - handed to the building thread
                    self.error = e

    def put(self, tokens: np.ndarray, langs: np.ndarray) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((tokens, langs))

    def close(self, check: bool = True) -> None:
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()
        if check and self.error is not None:
            raise self.error


class _ChunkAborted(Exception):
    """An earlier chunk failed: this one is not written (the parent reports the earlier chunk's error)."""


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


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
    """A chunk given as (input, first line, (byte offset, byte count, line count)) -> the chunk with its
    lines as one ``LineText``, read here, where it is converted (a pool worker: the parent does not pickle
    the text to every worker)."""
    fi, first, (offset, nbytes, nlines) = chunk
    spec = _CTX["inputs"][fi]
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


def _pool_chunk(job) -> Dict[str, Any]:
    """A pool worker's task: the chunk's lines are read here (the parent does not pickle text to the
    workers), and its tokens and languages are written here, into the final files at the offset the
    workers agree on (``_OffsetChain``); only the document lengths and counts go back to the parent."""
    index, chunk = job
    chain: _OffsetChain = _CTX["chain"]
    try:
        res = _process_chunk((index, chunk))
    except BaseException:
        chain.publish(index, -1)
        raise
    start = chain.start_of(index)
    if start < 0:
        chain.publish(index, -1)
        raise _ChunkAborted(f"chunk {index}: an earlier chunk failed")
    tokens, langs = res.pop("tokens"), res.pop("langs")
    chain.publish(index, start + int(tokens.size))
    if tokens.size:
        tok_fd, lang_fd = _CTX["fds"]
        with writing(_CTX["outputs"][0]):
            _pwrite_all(tok_fd, tokens, start * tokens.itemsize)
        with writing(_CTX["outputs"][1]):
            _pwrite_all(lang_fd, langs, start)
    res["placed"] = int(tokens.size)
    return res


def _process_chunk(job) -> Dict[str, Any]:
    """Parse, validate and convert one chunk. Runs in a worker."""
    index, chunk = job
    if isinstance(chunk[2], tuple):
        chunk = _read_range(chunk)
    opts: BuildOptions = _CTX["opts"]
    inputs: List[InputSpec] = _CTX["inputs"]
    dtype = _CTX["dtype"]
    fi = chunk[0]
    spec = inputs[fi]
    res = _fast_chunk(spec, chunk, opts, dtype)
    if res is not None:
        tokens, langs, lengths, stats, unknown = res[:5]
        out = {"tokens": tokens, "langs": langs, "lengths": lengths, "stats": stats, "bad": [],
               "unknown": {fi: unknown} if unknown else {}}
        if spec.kind == "npy":          # the chunk's first start and last end, for the build to check (span)
            first, last = _record_lines(chunk)
            out["span"] = (fi, first, res[5][0], last, res[5][1])
        return out
    vocab = opts.vocab
    stats, bad = Stats(), []
    docs_out = []
    unknown: Set[str] = set()
    cursor = BoundsCursor(spec.path, opts.allow_gaps) if spec.kind == "npy" else None
    for fi, line, text in chunk_items(chunk):
        try:
            rec = parse_item(spec, line, text, vocab.codebook_size, vocab.languages, opts.story_langs, opts.lang,
                             bounds=cursor)
            st = Stats()
            docs = record_documents(rec, spec.source, opts, _CTX["encoder"],
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


class _NoProgress:
    """What ``_progress`` returns when no bar is shown: tqdm's import and first bar cost ~35 ms, more than a
    whole build of 4.5M units from .npz."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass


def _progress(opts: BuildOptions, desc: str):
    if not (opts.progress and sys.stderr.isatty()):
        return _NoProgress()
    from tqdm import tqdm
    return tqdm(desc=desc, unit="rec", file=sys.stderr)


def _chunk_len(chunk) -> int:
    payload = chunk[2]
    if isinstance(payload, int):
        return payload
    return payload[2] if isinstance(payload, tuple) else len(payload)   # a range, a LineText or lines


def _pool_context():
    """fork, unless this process already holds torch (a caller that trained, or a second build in one
    process: the index writer imports megatron-core): forking that costs ~0.1 s per worker, so the workers
    then come from a fork server that holds only data_tools."""
    if "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data_tools.build"])
    return ctx


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
    return opts.workers > 1 and (bool(opts.bpe_model) or any(s.kind not in ("npy", "npz") for s in specs))


def _in_order(jobs, limit: int, submit, result):
    """Yield (result, records) of each job in input order, with at most ``limit`` jobs submitted ahead of
    the one being waited for: ``submit(job)`` returns a handle, ``result(handle)`` waits for its result."""
    pending = collections.deque()
    for job in jobs:
        pending.append((submit(job), _chunk_len(job[1])))
        while len(pending) >= limit:
            handle, n = pending.popleft()
            yield result(handle), n
    while pending:
        handle, n = pending.popleft()
        yield result(handle), n


def _run_chunks(jobs, opts: BuildOptions, ctx: Dict[str, Any], processes: bool):
    """Yield chunk results in input order: converted here (one worker), by converter threads, or by worker
    processes (``uses_processes``), with a bounded number of chunks in flight."""
    if opts.workers == 1:
        _init_worker(ctx)
        for job in jobs:
            yield _process_chunk(job), _chunk_len(job[1])
        return
    if not processes:
        _init_worker(ctx)
        ex = ThreadPoolExecutor(opts.workers, thread_name_prefix="data_tools-convert")
        try:
            yield from _in_order(jobs, THREAD_IN_FLIGHT * opts.workers, lambda job: ex.submit(_process_chunk, job),
                                 lambda future: future.result())
        finally:
            ex.shutdown(wait=True, cancel_futures=True)    # on error: no thread converts on after the build
        return
    mp = _pool_context()
    pool = _Workers(mp, opts.workers, dict(ctx, chain=_OffsetChain(mp, opts.workers)))
    ended = False
    try:
        # line chunks come as byte ranges (iter_chunk_ranges): a worker reads its own
        yield from _in_order(jobs, IN_FLIGHT * opts.workers, pool.submit, pool.result)
        ended = True
    finally:
        pool.close(ended)


def _worker_main(ctx: Dict[str, Any], tasks, results) -> None:
    """A pool worker: chunks from ``tasks`` until None, each answered on ``results`` as (index, "ok", result)
    or (index, "error", the exception)."""
    _init_pool_worker(ctx)
    while True:
        job = tasks.get()
        if job is None:
            return
        try:
            out = (job[0], "ok", _pool_chunk(job))
        except BaseException as e:   # noqa: BLE001 - handed to the parent, which raises it in input order
            out = (job[0], "error", e)
        try:
            results.put(out)
        except Exception as e:       # noqa: BLE001 - an exception that does not pickle: its text
            results.put((job[0], "error", DataError(f"{type(out[2]).__name__}: {out[2]}" if out[1] == "error"
                                                    else f"cannot return the chunk's result ({e})")))


class _Workers:
    """``--workers N`` processes fed chunks through one task pipe and answering through one result pipe,
    read (and put back in input order) by the build's own thread. Hand-written instead of ``multiprocessing.Pool``: the Pool's three
    helper threads hand every task and result from thread to thread, which cost the parent ~0.7 ms of CPU
    per chunk on the 2-core benchmark machine (its cores are the workers' too: a 258 MB JSONL's 195
    chunks took the parent 264 ms of CPU), and a worker that dies (the OOM killer) leaves a Pool waiting
    for its result forever; here it is an error naming its exit."""

    def __init__(self, mp, n: int, ctx: Dict[str, Any]):
        # held for the pool's life: with a fork server the workers unpickle ctx's locks (the offset chain's)
        # after start() returns, and a lock the parent no longer holds is unlinked from under them
        self.ctx = ctx
        self.done: Dict[int, tuple] = {}      # answers that came back before an earlier chunk's
        self.tasks, self.results = mp.SimpleQueue(), mp.SimpleQueue()
        self.procs = [mp.Process(target=_worker_main, args=(ctx, self.tasks, self.results), daemon=True,
                                 name=f"data_tools-worker-{i}") for i in range(n)]
        for p in self.procs:
            p.start()

    def submit(self, job) -> int:
        self.tasks.put(job)
        return job[0]

    def result(self, index: int):
        """Chunk ``index``'s result (answers for later chunks that come first are kept), or its error."""
        while index not in self.done:
            i, status, payload = self._get()
            self.done[i] = (status, payload)
        status, payload = self.done.pop(index)
        if status != "ok":
            raise payload
        return payload

    def _get(self):
        """The next (index, status, payload) any worker sends; DataError if a worker died instead."""
        from multiprocessing.connection import wait

        reader = self.results._reader
        while True:
            ready = wait([reader] + [p.sentinel for p in self.procs])
            if reader in ready:
                return self.results.get()
            for p in self.procs:
                if p.exitcode is not None:
                    how = (f"killed by signal {-p.exitcode}" + (" (out of memory?)" if p.exitcode == -9 else "")
                           if p.exitcode < 0 else f"exit code {p.exitcode}")
                    raise DataError(f"a build worker process died ({how}); nothing was written at the output "
                                    f"prefix")

    def close(self, ended: bool) -> None:
        """After the last result: the workers are told to stop and joined. On an error: stopped at once (a
        worker may be waiting on a chunk that failed)."""
        if ended:
            for _ in self.procs:
                self.tasks.put(None)
            for p in self.procs:
                p.join(timeout=30)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join()
        self.tasks.close()
        self.results.close()


HASH_WINDOW = 16 << 20     # _hash_file: bytes mapped at a time


def _hash_file(h, path: str) -> None:
    """Feed a whole file to the hash through read-only maps of it: no copy into a buffer first (the pool's
    output, 135 MB on the benchmark's 10x input: 6 ms against 17 ms read in 4 MiB blocks), one window of
    HASH_WINDOW bytes at a time (a map of the whole output would count its size in this process's memory)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        for at in range(0, size, HASH_WINDOW):
            with mmap.mmap(f.fileno(), min(HASH_WINDOW, size - at), offset=at, access=mmap.ACCESS_READ) as m:
                h.update(m)


class _Lengths:
    """The documents' lengths, for the .idx files written at the end: in memory up to KEEP documents, then
    appended to a file in the build's temporary directory, so that a build's memory does not grow with its
    number of documents (8 bytes each: 800 MB for 100M utterances)."""

    KEEP = INDEX_BLOCK

    def __init__(self, path: str):
        self.path, self.mem, self.in_mem, self.count, self.file = path, [], 0, 0, None

    def add(self, lengths: np.ndarray) -> None:
        self.mem.append(lengths)
        self.in_mem += lengths.size
        self.count += lengths.size
        if self.in_mem >= self.KEEP:
            with writing(self.path):
                if self.file is None:
                    self.file = open(self.path, "wb")
                for a in self.mem:
                    self.file.write(np.ascontiguousarray(a, dtype=np.int64))
            self.mem, self.in_mem = [], 0

    def blocks(self):
        """The lengths in order, as blocks of at most about INDEX_BLOCK documents (re-iterable)."""
        if self.file is not None:
            with writing(self.path):
                self.file.flush()
            with open(self.path, "rb", buffering=0) as f:
                at, size = 0, os.fstat(f.fileno()).st_size
                while at < size:
                    blk = os.pread(f.fileno(), min(INDEX_BLOCK * 8, size - at), at)
                    at += len(blk)
                    yield np.frombuffer(blk, dtype=np.int64)
        if len(self.mem) > 1:
            self.mem = [np.concatenate(self.mem)]
        yield from self.mem

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()


class _Quarantine:
    """The bad records of a ``--skip-bad`` build, written to the temporary report as they come (not kept)."""

    def __init__(self, path: str):
        self.path, self.count, self.file = path, 0, None

    def add(self, entries: List[Dict[str, Any]]) -> None:
        if not entries:
            return
        with writing(self.path, "the quarantine report"):
            if self.file is None:
                self.file = open(self.path, "w")
            for b in entries:
                self.file.write(json.dumps(b) + "\n")
        self.count += len(entries)

    def close(self) -> None:
        if self.file is not None and not self.file.closed:
            with writing(self.path, "the quarantine report"):
                self.file.close()


def _write_indexes(final: str, dtype, lengths: _Lengths) -> None:
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
    lengths = None
    try:
        tok_size = vocab_size_of(opts)
        dtype = token_dtype(tok_size)
        final = os.path.join(tmpdir, "final")
        outputs = (final + ".bin", lang_prefix(final) + ".bin")
        ctx = {"opts": opts, "inputs": specs, "dtype": dtype, "fast": _fast_enabled(),
               "outputs": outputs}
        processes = uses_processes(specs, opts)
        jobs = enumerate(iter_chunk_ranges(specs, opts.chunk_size,
                                           BINARY_CHUNK_FACTOR if processes else LOCAL_BINARY_CHUNK_FACTOR,
                                           opts.max_line_bytes))
        total = Stats()
        lengths = _Lengths(os.path.join(tmpdir, "lengths.i64"))
        bad = _Quarantine(os.path.join(tmpdir, "quarantine.jsonl"))
        ends: Dict[int, tuple] = {}     # .npy inputs: (line, end) of the last record's range so far
        unknown: Dict[int, Set[str]] = {}
        h = content_hasher(CONTENT_HASH)
        placed = 0              # tokens the pool workers wrote into the outputs themselves
        with writing(outputs[0]):
            tf = open(outputs[0], "wb")
        try:
            with writing(outputs[1]):
                lf = open(outputs[1], "wb")
        except BaseException:
            tf.close()
            raise
        results = writer = None
        try:
            results = _run_chunks(jobs, opts, ctx, processes)
            writer = None if processes else _Writer(tf, lf, h)
            with _progress(opts, f"build {os.path.basename(output_prefix)}") as bar:
                for res, n in results:
                    _check_spans(specs, res, ends, opts)
                    total.add(res["stats"])
                    bad.add(res["bad"])
                    for fi, names in res["unknown"].items():
                        unknown.setdefault(fi, set()).update(names)
                    if res["lengths"].size:
                        lengths.add(res["lengths"])
                    if "placed" in res:
                        placed += res["placed"]
                    elif res["lengths"].size:
                        writer.put(res["tokens"], res["langs"])
                    bar.update(n)
            if writer is not None:
                if total.documents:     # the .idx files while the thread writes the last chunk
                    _write_indexes(final, dtype, lengths)
                writer.close()
            _close(tf)
            _close(lf)
            bad.close()
        finally:
            if writer is not None:
                writer.close(check=False)   # on error: the thread ends before the temps are removed
            if results is not None:
                results.close()     # on error: terminate and join the workers before removing the temps
            for f in (tf, lf, bad.file):    # on error (closed already otherwise)
                if f is not None and not f.closed:
                    with contextlib.suppress(OSError):
                        f.close()
        _check_ends(specs, ends, opts)
        if total.documents == 0:
            raise DataError("no valid records: refusing to write an empty dataset"
                            + (f" ({bad.count} quarantined)" if bad.count else ""), path=specs[0].path)
        if placed and os.path.getsize(outputs[0]) != placed * np.dtype(dtype).itemsize:
            raise DataError(f"the workers wrote {os.path.getsize(outputs[0])} bytes, expected {placed} tokens",
                            path=outputs[0])
        if writer is None:
            _write_indexes(final, dtype, lengths)
        lengths.close()
        for path in (outputs if placed else outputs[1:]):   # the writer thread hashed its tokens as it wrote
            _hash_file(h, path)
        ignored = {specs[fi].path: sorted(names) for fi, names in sorted(unknown.items())}
        for path, names in ignored.items():
            print(f"warning: {path}: unknown field(s) {names} ignored (data_tools reads only the fields in "
                  f"docs/data_tools.md)", file=sys.stderr)

        quarantine_path = output_prefix + ".quarantine.jsonl" if bad.count else None
        manifest = make_manifest(opts, specs, total, tok_size, dtype, h.hexdigest(), bad.count, quarantine_path,
                                 ignored)
        tmp_manifest = os.path.join(tmpdir, "manifest.json")
        with writing(tmp_manifest):
            with open(tmp_manifest, "w") as f:
                json.dump(manifest, f, indent=2, sort_keys=False)
                f.write("\n")

        # commit: drop an old manifest first (an interrupted commit then reads as "no dataset"),
        # move the data files, the manifest last.
        if os.path.exists(manifest_path(output_prefix)):
            os.remove(manifest_path(output_prefix))
        moves = [(src + ext, dst + ext) for src, dst in ((final, output_prefix), (lang_prefix(final),
                                                                                  lang_prefix(output_prefix)))
                 for ext in (".bin", ".idx")]
        if quarantine_path:
            moves.append((bad.path, quarantine_path))
        elif os.path.exists(output_prefix + ".quarantine.jsonl"):
            os.remove(output_prefix + ".quarantine.jsonl")
        commit_files(moves + [(tmp_manifest, manifest_path(output_prefix))])
        return manifest
    finally:
        clear_caches()
        if lengths is not None:
            lengths.close()
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
