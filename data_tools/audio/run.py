"""Sharded, resumable tokenisation under the training launchers (torchrun / deepspeed / a single process).

Layout of the work folder ``<output>.work/`` (kept: it is the resume state; delete it to start over):

* ``plan.json``: fingerprint of (file list in order, tokeniser, dedup, shard size, channel). A re-run
  with anything different refuses to mix its units with the old ones.
* Files are cut, in manifest order, into shards of ``shard_size``; shard k belongs to rank k % world.
  Each finished shard is ``shard-K.jsonl`` (written to a temporary name, then renamed). The shard in
  progress appends one fsync'ed batch at a time to ``shard-K.part.jsonl``: a kill loses at most the
  batch in flight; a re-run keeps the complete lines, skips finished shards and finished files.
* ``log.*.txt``: the global index of every file the model encoded, appended per batch by every run
  (audit trail: a correct resume never lists a file twice).
* When every shard is done, rank 0 merges them in manifest order into ``<output>`` (temporary name,
  then rename) and writes the sidecar ``<output stem>.units.json`` (tokeniser, unit_source, counts).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import numpy as np

from data_tools.audio.io import AudioError, audio_info, check_channels, load_audio
from data_tools.audio.manifest import AudioEntry
from data_tools.audio.provenance import sidecar_path
from data_tools.common import atomic_write_text
from data_tools.errors import DataError

FORMAT = "megaslm-units"
VERSION = 1


@dataclasses.dataclass
class TokenizeOptions:
    output: str
    shard_size: int = 256
    batch_size: int = 16                 # files per forward
    batch_seconds: float = 600.0         # padded seconds of audio per forward
    dedup: bool = False                  # write run-length-collapsed units + `duration`
    channel: Optional[int] = None        # None: mix to mono
    skip_bad: bool = False
    progress: bool = True
    languages: Optional[Tuple[str, ...]] = None


def source_id(tok, dedup: bool) -> str:
    """The vocabulary's unit_source: the tokeniser's id, plus ':dedup' when runs were collapsed at tokenisation
    (deduplicated and raw units are different sequences: never mixed, and benchmarks must follow)."""
    return tok.unit_source + (":dedup" if dedup else "")


def _dist():
    """(rank, world, group-or-None) from the launcher's environment; gloo is enough (barriers, small objects)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import datetime

    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size(), dist


def _dedup(units: np.ndarray) -> Tuple[List[int], List[int]]:
    change = np.flatnonzero(np.diff(units)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [len(units)]]))
    return units[starts].tolist(), lengths.tolist()


def _check_header(e: AudioEntry, tok, channel) -> Tuple[Optional[float], Optional[str]]:
    """(seconds, None) or (None, one-line error) from the header alone."""
    try:
        n, sr, ch = audio_info(e.path)
        if n == 0:
            raise AudioError("empty audio (0 samples)", path=e.path)
        check_channels(e.path, ch, channel)
        if -(-n * tok.sample_rate // sr) < tok.min_samples:
            raise AudioError(f"too short: {n / sr:.4f} s; the tokeniser needs at least "
                             f"{tok.min_samples / tok.sample_rate:.4f} s", path=e.path)
        return n / sr, None
    except AudioError as err:
        return None, f"{err} (listed at {e.where})" if e.where != e.path else str(err)


def _read_part(path: str) -> List[dict]:
    """Complete lines of a partial shard; a torn last line (kill mid-write) is cut off."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    good = data[: data.rfind(b"\n") + 1]
    if len(good) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(good))
    return [json.loads(l) for l in good.decode().splitlines() if l.strip()]


def _atomic_write(path: str, text: str) -> None:
    """data_tools.audio's files (work folder, output, converted benchmarks): whole or absent, and on disk (fsync)
    before they count."""
    atomic_write_text(path, text, fsync=True)


def tokenize(entries: List[AudioEntry], tok, opts: TokenizeOptions) -> Optional[Dict]:
    """Tokenise ``entries`` into ``opts.output`` (see the module doc): this rank's shards, then (rank 0) the
    merge. Returns the sidecar on rank 0, None on the others."""
    rank, world, dist = _dist()
    work = opts.output + ".work"
    S = opts.shard_size
    shards = list(range(rank, -(-len(entries) // S), world))
    mine = [i for k in shards for i in range(k * S, min((k + 1) * S, len(entries)))]
    # 1) headers of this rank's files (cheap): bad files fail (or are quarantined) before any model work
    seconds, bad = _check_headers(entries, mine, tok, opts, dist, world)
    _check_plan(work, entries, tok, opts)
    # 2) this rank's shards
    todo = _unfinished_shards(work, shards, S, len(entries))
    _ShardEncoder(entries, tok, opts, work, rank, seconds, bad).run(todo)
    if dist is not None:
        dist.barrier()
    result = merge(entries, tok, opts, work) if rank == 0 else None
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _check_headers(entries: List[AudioEntry], mine: List[int], tok, opts: TokenizeOptions, dist, world: int):
    """(seconds of each good file, one-line error of each bad one) for this rank's files, from their headers;
    unless ``skip_bad``, the first bad file of any rank fails every rank (the same error)."""
    seconds: Dict[int, float] = {}
    bad: Dict[int, str] = {}
    for i in mine:
        s, err = _check_header(entries[i], tok, opts.channel)
        if err:
            bad[i] = err
        else:
            seconds[i] = s
    first_err = min(bad) if bad and not opts.skip_bad else None
    errs = [(first_err, bad[first_err]) if first_err is not None else None]
    if dist is not None:
        allv = [None] * world
        dist.all_gather_object(allv, errs[0])
        errs = allv
    errs = sorted(e for e in errs if e is not None)
    if errs:
        raise AudioError(errs[0][1])
    return seconds, bad


def _check_plan(work: str, entries: List[AudioEntry], tok, opts: TokenizeOptions) -> None:
    """The work folder's plan.json: written by the first run, and a re-run with a different file list,
    tokeniser, --dedup, --shard-size or --channel refused (its units would mix with the old ones)."""
    fp = hashlib.sha256(json.dumps([[e.path, e.id, e.lang, e.story, e.sentence] for e in entries]
                                   + [source_id(tok, opts.dedup), opts.shard_size, opts.channel]).encode()).hexdigest()
    os.makedirs(work, exist_ok=True)
    plan_path = os.path.join(work, "plan.json")
    plan = {"fingerprint": fp, "files": len(entries), "shard_size": opts.shard_size,
            "unit_source": source_id(tok, opts.dedup)}
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
        if old.get("fingerprint") != fp:
            raise DataError("this work folder belongs to a different run (file list, tokeniser, --dedup, "
                            "--shard-size or --channel changed); delete it to start over", path=plan_path)
    else:
        _atomic_write(plan_path, json.dumps(plan, indent=1))


def _unfinished_shards(work: str, shards: List[int], S: int, n: int) -> List[Tuple[int, List[int], List[dict]]]:
    """(shard, its files not done yet, the records its partial file kept) of each of ``shards`` not finished."""
    todo: List[Tuple[int, List[int], List[dict]]] = []
    for k in shards:
        if os.path.exists(os.path.join(work, f"shard-{k:06d}.jsonl")):
            continue
        part = _read_part(os.path.join(work, f"shard-{k:06d}.part.jsonl"))
        done = {r["i"] for r in part}
        todo.append((k, [i for i in range(k * S, min((k + 1) * S, n)) if i not in done], part))
    return todo


def _batches(good: List[int], seconds: Dict[int, float], opts: TokenizeOptions) -> List[List[int]]:
    """Length-sorted batches (longest first), capped in files and padded seconds."""
    good = sorted(good, key=lambda i: (-seconds[i], i))
    batches, cur = [], []
    for i in good:
        if cur and (len(cur) >= opts.batch_size or seconds[cur[0]] * (len(cur) + 1) > opts.batch_seconds):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _load_batch(batch: List[int], entries: List[AudioEntry], tok, channel) -> List[tuple]:
    """(index, waveform or None, error or None) of each file of a batch: decoded and resampled."""
    out = []
    for i in batch:
        try:
            out.append((i, load_audio(entries[i].path, tok.sample_rate, channel, tok.min_samples), None))
        except AudioError as err:
            out.append((i, None, str(err)))
    return out


def _progress_bar(opts: TokenizeOptions, rank: int, todo, seconds: Dict[int, float]):
    if not (opts.progress and todo):
        return None
    total_h = 0.0
    for _, rest, _ in todo:
        total_h += sum(seconds.get(i, 0.0) for i in rest) / 3600
    from megaslm.progress import Progress   # a tqdm bar on a TTY, else a line every N seconds (a SLURM log)
    return Progress(f"tokenize rank {rank} audio hours", total=round(total_h, 6), unit="h", position=rank,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} h [{elapsed}<{remaining}, "
                    "{rate_fmt}]")


class _ShardEncoder:
    """This rank's unfinished shards encoded one after the other (``run``): each shard's files batch by batch,
    the next batch decoded in a thread while the model runs, every batch appended (fsync'ed) to the shard's
    partial file and logged, then the shard written whole and its partial file removed."""

    def __init__(self, entries: List[AudioEntry], tok, opts: TokenizeOptions, work: str, rank: int,
                 seconds: Dict[int, float], bad: Dict[int, str]):
        self.entries, self.tok, self.opts, self.work, self.rank = entries, tok, opts, work, rank
        self.seconds, self.bad = seconds, bad
        self.log_path = os.path.join(work, f"log.r{rank}.{int(time.time() * 1e6)}.{os.getpid()}.txt")
        self.pool = self.bar = None

    def run(self, todo: List[Tuple[int, List[int], List[dict]]]) -> None:
        self.bar = _progress_bar(self.opts, self.rank, todo, self.seconds)
        self.pool = ThreadPoolExecutor(max_workers=2)    # decode + resample the next batch while the model runs
        ok = False
        try:
            for k, rest, part in todo:
                self._shard(k, rest, part)
            ok = True
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            if self.bar is not None:
                self.bar.close(ok)

    def _load(self, batch: List[int]):
        return self.pool.submit(_load_batch, batch, self.entries, self.tok, self.opts.channel)

    def _shard(self, k: int, rest: List[int], part: List[dict]) -> None:
        bad = self.bad
        part_path = os.path.join(self.work, f"shard-{k:06d}.part.jsonl")
        recs = list(part)
        recs += [{"i": i, "bad": bad[i]} for i in rest if i in bad]
        batches = _batches([i for i in rest if i not in bad], self.seconds, self.opts)
        with open(part_path, "a", encoding="utf-8") as pf, open(self.log_path, "a") as lf:
            for b in [{"i": i, "bad": bad[i]} for i in rest if i in bad]:
                pf.write(json.dumps(b) + "\n")
            futs = [self._load(batches[0])] if batches else []
            for j in range(len(batches)):
                loaded = futs[j].result()
                if j + 1 < len(batches):
                    futs.append(self._load(batches[j + 1]))
                lines, ok = self._encode(loaded)
                pf.write("".join(json.dumps(l) + "\n" for l in lines))
                pf.flush()
                os.fsync(pf.fileno())
                lf.write("".join(f"{i}\n" for i, _ in ok))
                lf.flush()
                recs += lines
                if self.bar is not None:
                    self.bar.update(sum(len(w) for _, w in ok) / self.tok.sample_rate / 3600)
        recs.sort(key=lambda r: r["i"])
        _atomic_write(os.path.join(self.work, f"shard-{k:06d}.jsonl"),
                           "".join(json.dumps(r) + "\n" for r in recs))
        os.remove(part_path)

    def _encode(self, loaded: List[tuple]):
        """A loaded batch -> (its records: units, or the error of a file that did not load under --skip-bad;
        the (index, waveform) pairs encoded)."""
        errs = [(i, e) for i, _, e in loaded if e]
        if errs and not self.opts.skip_bad:
            raise AudioError(errs[0][1])
        ok = [(i, w) for i, w, e in loaded if not e]
        units = self.tok.encode_batch([w for _, w in ok]) if ok else []
        lines = [{"i": i, "bad": e} for i, e in errs]
        for (i, w), u in zip(ok, units):
            lines.append({"i": i, "units": u.tolist(), "samples": int(len(w))})
        return lines, ok


def _story_lines(entries: List[AudioEntry], stories: Dict[str, Dict[str, Dict[int, list]]], story_order: List[str],
                 langs_seen: List[str], quarantined: List[dict], skip_bad: bool) -> Tuple[List[str], List[dict]]:
    """The output lines of the stories (every language needs every sentence), and the stories dropped under
    ``skip_bad`` (else the first incomplete one is an error)."""
    bad_story = set(q["id"] for q in quarantined)
    out_lines, dropped = [], []
    for sid in story_order:
        st = stories.get(sid, {})
        ids_of = {lang: sorted(v) for lang, v in st.items()}
        problem = None
        if any(ent.story == sid and ent.id in bad_story for ent in entries):
            problem = "a sentence's audio was quarantined"
        elif set(ids_of) != set(langs_seen):
            problem = f"languages {sorted(ids_of)} but the corpus has {sorted(langs_seen)}"
        else:
            ref = ids_of[langs_seen[0]]
            for lang in langs_seen:
                if ids_of[lang] != ref:
                    problem = f"sentences {ids_of[lang]} in {lang!r} but {ref} in {langs_seen[0]!r}"
        if problem:
            if not skip_bad:
                raise DataError(f"story {sid!r}: {problem} (every language needs every sentence)")
            dropped.append({"story": sid, "error": problem})
            continue
        obj = {"id": sid}
        for lang in langs_seen:
            obj[lang] = [st[lang][s] for s in sorted(st[lang])]
        out_lines.append(json.dumps(obj))
    return out_lines, dropped


def merge(entries: List[AudioEntry], tok, opts: TokenizeOptions, work: str) -> Dict:
    S = opts.shard_size
    recs: Dict[int, dict] = {}
    for k in range(-(-len(entries) // S)):
        with open(os.path.join(work, f"shard-{k:06d}.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                recs[r["i"]] = r
    assert len(recs) == len(entries), "every file has exactly one record"
    frames_total, seconds_total, quarantined = 0, 0.0, []
    out_lines: List[str] = []
    stories: Dict[str, Dict[str, Dict[int, list]]] = {}
    story_order: List[str] = []
    langs_seen: List[str] = []
    for i, e in enumerate(entries):
        r = recs[i]
        if "bad" in r:
            quarantined.append({"file": e.path, "id": e.id, "error": r["bad"]})
            continue
        u = np.asarray(r["units"], dtype=np.int64)
        frames_total += len(u)
        seconds_total += r["samples"] / tok.sample_rate
        if e.lang not in langs_seen:
            langs_seen.append(e.lang)
        if e.story is None:
            obj = {"file_name": e.listed, "units": u.tolist(), "lang": e.lang}
            if e.id != e.listed:
                obj["id"] = e.id
            if opts.dedup:
                obj["units"], obj["duration"] = _dedup(u)
            out_lines.append(json.dumps(obj))
        else:
            if e.story not in stories:
                stories[e.story] = {}
                story_order.append(e.story)
            stories[e.story].setdefault(e.lang, {})[e.sentence] = u.tolist() if not opts.dedup else _dedup(u)[0]
    kind = "stories" if entries[0].story is not None else "utterances"
    if kind == "stories":
        lines, dropped = _story_lines(entries, stories, story_order, langs_seen, quarantined, opts.skip_bad)
        out_lines += lines
        quarantined += dropped
    text = "".join(l + "\n" for l in out_lines)
    qpath = sidecar_path(opts.output)[: -len(".units.json")] + ".quarantine.jsonl"
    if quarantined:
        _atomic_write(qpath, "".join(json.dumps(q) + "\n" for q in quarantined))
    elif os.path.exists(qpath):
        os.remove(qpath)
    side = {"format": FORMAT, "version": VERSION, "kind": kind, "output": os.path.basename(opts.output),
            "unit_source": source_id(tok, opts.dedup), "tokenizer": tok.describe(), "codebook_size": tok.codebook_size,
            "frame_rate": tok.frame_rate, "dedup": opts.dedup, "languages": langs_seen,
            "files": len(entries) - len([q for q in quarantined if "file" in q]),
            "records": len(out_lines), "frames": frames_total, "hours": seconds_total / 3600,
            "content_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "quarantine": {"count": len(quarantined), "report": qpath if quarantined else None}}
    _atomic_write(opts.output, text)
    _atomic_write(sidecar_path(opts.output), json.dumps(side, indent=1))
    return side
