"""The execution engine of a build (``data_tools.build``): chunks in, their results back in input order, the
converted arrays written into the output files. It knows nothing of input formats or of what a chunk holds:
the build hands it a ``convert(job)`` function (a result dict with ``tokens``, ``langs`` and ``lengths``) and
a context for it.

Three ways to run the chunks (``run_chunks``): in this process; in N converter threads (.npy/.npz inputs,
whose NumPy calls release the GIL); or in N worker processes (``_Workers``) that take the chunks from one task
pipe (at most IN_FLIGHT chunks per worker in flight), convert them, and write their arrays into the final files
themselves, at the offset the workers agree on (``_OffsetChain``). In this process (and with threads), a
writer thread (``Writer``) appends the arrays and hashes them while the next chunk is converted. The documents'
lengths (``Lengths``) and a ``--skip-bad`` build's bad records (``Quarantine``) go to temporary files as they
come, so a build's memory does not grow with its input.
"""
from __future__ import annotations

import collections
import json
import mmap
import multiprocessing
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

import numpy as np

from data_tools.common import INDEX_BLOCK, keep_freed_memory, write_error, writing
from data_tools.errors import DataError

# This process's worker context: the build's (options, inputs, dtype, ``convert``, ``setup``) plus the
# engine's own (a pool worker's offset chain and output descriptors). Set by ``init_worker``.
CTX: Dict[str, Any] = {}
# Chunks handed to each pool worker ahead of the results the parent is waiting for: with 2, a worker sat
# idle whenever the parent was late to collect (the parent shares the cores with the workers).
IN_FLIGHT = 4
# Converter threads (.npy/.npz, ``build.uses_processes``): chunks per thread ahead of the one the writer waits for.
# 2 is as fast as 4 on the benchmark's 10x .npz (109-112 ms with 2 threads, 123-125 ms with 4, either way) and
# holds half the converted chunks in memory.
THREAD_IN_FLIGHT = 2


def init_worker(ctx: Dict[str, Any]) -> None:
    """Make ``ctx`` this process's CTX and run its ``setup`` (e.g. the build's encoder), if any."""
    CTX.clear()
    CTX.update(ctx)
    setup = ctx.get("setup")
    if setup is not None:
        setup()


def _init_pool_worker(ctx: Dict[str, Any]) -> None:
    keep_freed_memory()         # a pool worker is our process (see common.keep_freed_memory)
    init_worker(ctx)
    CTX["fds"] = tuple(os.open(p, os.O_WRONLY) for p in ctx["outputs"])


class _OffsetChain:
    """Where each chunk's tokens start in the output, agreed between the pool workers themselves: chunk k
    starts where chunk k-1 ends, and chunk k-1's worker publishes that end as soon as it has converted its
    chunk, before it writes. So a worker waits only for the previous chunk's conversion (which started
    before its own), and the workers write their chunks into the final files at the same time -- no chunk
    is written twice or copied by the parent. A ring of (chunk index, end) slots in shared memory, more
    slots than chunks in flight (see ``run_chunks``); an end of -1 marks a chunk that failed, so that the
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

class Writer:
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
                    self.error = write_error(e, f.name)
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

def _pool_chunk(job) -> Dict[str, Any]:
    """A pool worker's task: the chunk's lines are read here (the parent does not pickle text to the
    workers), and its tokens and languages are written here, into the final files at the offset the
    workers agree on (``_OffsetChain``); only the document lengths and counts go back to the parent."""
    index, chunk = job
    chain: _OffsetChain = CTX["chain"]
    try:
        res = CTX["convert"]((index, chunk))
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
        tok_fd, lang_fd = CTX["fds"]
        with writing(CTX["outputs"][0]):
            _pwrite_all(tok_fd, tokens, start * tokens.itemsize)
        with writing(CTX["outputs"][1]):
            _pwrite_all(lang_fd, langs, start)
    res["placed"] = int(tokens.size)
    return res

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


def run_chunks(jobs, workers: int, ctx: Dict[str, Any], processes: bool):
    """Yield (result, records) of each job in input order: ``ctx["convert"](job)`` run here (one worker), by
    ``workers`` converter threads, or by ``workers`` processes (``processes``; each writes its own arrays
    into ``ctx["outputs"]``), with a bounded number of chunks in flight. ``job``: (index, chunk)."""
    if workers == 1:
        init_worker(ctx)
        convert = ctx["convert"]
        for job in jobs:
            yield convert(job), _chunk_len(job[1])
        return
    if not processes:
        init_worker(ctx)
        ex = ThreadPoolExecutor(workers, thread_name_prefix="data_tools-convert")
        try:
            yield from _in_order(jobs, THREAD_IN_FLIGHT * workers, lambda job: ex.submit(ctx["convert"], job),
                                 lambda future: future.result())
        finally:
            ex.shutdown(wait=True, cancel_futures=True)    # on error: no thread converts on after the build
        return
    mp = _pool_context()
    pool = _Workers(mp, workers, dict(ctx, chain=_OffsetChain(mp, workers)))
    ended = False
    try:
        # line chunks come as byte ranges (iter_chunk_ranges): a worker reads its own
        yield from _in_order(jobs, IN_FLIGHT * workers, pool.submit, pool.result)
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



HASH_WINDOW = 16 << 20     # hash_file: bytes mapped at a time


def hash_file(h, path: str) -> None:
    """Feed a whole file to the hash through read-only maps of it: no copy into a buffer first (the pool's
    output, 135 MB on the benchmark's 10x input: 6 ms against 17 ms read in 4 MiB blocks), one window of
    HASH_WINDOW bytes at a time (a map of the whole output would count its size in this process's memory)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        for at in range(0, size, HASH_WINDOW):
            with mmap.mmap(f.fileno(), min(HASH_WINDOW, size - at), offset=at, access=mmap.ACCESS_READ) as m:
                h.update(m)


class Lengths:
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


class Quarantine:
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


