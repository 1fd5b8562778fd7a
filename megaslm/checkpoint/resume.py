"""Which checkpoint a run resumes from: integrity checks, fallback past corrupted ones, the config check.

``select_resume`` runs before any model is built. ``checkpoint.load`` naming one tag directory: that one,
intact, or an error. Otherwise the newest intact checkpoint of the directory: corrupted newer ones are
passed over with a warning naming both (and left as they are); if checkpoints exist but none is intact,
an error (never a silent restart). A config whose run-changing fields differ from the checkpoint's is
refused unless ``allow_config_change``.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

from megaslm.checkpoint.layout import (CANON_MODEL, CANON_OPTIM, LATEST, META, MP_FILE, STATE_FILE,
                                       CheckpointError, complete_tags, file_crc32, is_canonical, one_line, read_latest,
                                       read_meta, state_file_name, tag_step)
from megaslm.checkpoint.safe import unsafe_globals
from megaslm.config import RunConfig, config_digest


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---- integrity -----------------------------------------------------------------------------------
def verify(tag_dir: str, world_size: Optional[int] = None, content: bool = True) -> Optional[str]:
    """None when ``tag_dir`` is complete and intact; else what is wrong (a corruption, one line).

    Sizes against the manifest in ``meta.json``, each torch file's zip directory, the expected set of
    files for the layout, and with ``content`` (``checkpoint.verify_content``, the default) every byte:
    each torch file's members against the CRC-32 its zip directory records (torch.save writes one per
    member, so this costs no time at save) and every other file against the CRC-32 the save recorded in
    ``meta.json``. Sizes alone pass a same-size corruption (16 KB of random bytes mid-shard), whose NaN
    weights then load and kill the run a step later. A pickle that imports anything outside the
    allow-list is not a corruption but an attack or a foreign file: it raises ``CheckpointError``
    (never falls back)."""
    try:
        meta = read_meta(tag_dir)
    except CheckpointError as e:
        return str(e)
    names = sorted(os.listdir(tag_dir))
    # the security scan first: a planted pickle is refused even where it also breaks the manifest
    problem = _scan_pickles(tag_dir, names)
    if problem:
        return problem
    manifest = meta.get("files") or {}
    for name, size in manifest.items():
        p = os.path.join(tag_dir, name)
        if not os.path.exists(p):
            return f"{p}: missing (listed in {META})"
        if os.path.getsize(p) != size:
            return f"{p}: {os.path.getsize(p)} bytes, {META} recorded {size} (truncated or overwritten)"
    if is_canonical(tag_dir):
        problem = _check_safetensors(tag_dir)
    else:
        problem = _check_deepspeed_files(tag_dir, names, world_size, bool(manifest))
    if problem is None and content:
        problem = check_content(tag_dir, names, meta.get("crc32") or {})
    return problem


def _content_problem(path: str, recorded: Optional[int]) -> Optional[str]:
    try:
        if recorded is not None:
            got = file_crc32(path)
            return None if got == recorded else \
                f"{path}: content CRC-32 {got:08x}, {META} recorded {recorded:08x} (corrupted in place)"
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        return None if bad is None else f"{path}: member {bad} fails its CRC-32 (corrupted in place)"
    except (zipfile.BadZipFile, OSError, RuntimeError) as e:
        return f"{path}: unreadable ({one_line(e)})"


def check_content(tag_dir: str, names: List[str], recorded: Dict[str, int]) -> Optional[str]:
    """The first file of ``tag_dir`` whose bytes fail a CRC-32: torch files against their zip directory's,
    the rest against ``recorded`` (meta.json's ``crc32``). Files are read in parallel threads (the CRC
    releases the GIL); about 0.6 s per GB per core on the CI machine."""
    jobs = [(os.path.join(tag_dir, n), recorded.get(n)) for n in names
            if n in recorded or n.endswith(".pt")]
    if not jobs:
        return None
    with ThreadPoolExecutor(max_workers=min(8, len(jobs), os.cpu_count() or 1)) as pool:
        for problem in pool.map(lambda job: _content_problem(*job), jobs):
            if problem:
                return problem
    return None


def _scan_pickles(tag_dir: str, names: List[str]) -> Optional[str]:
    for n in names:
        if not n.endswith(".pt"):
            continue
        p = os.path.join(tag_dir, n)
        try:
            with zipfile.ZipFile(p) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"{p}: not a readable torch file ({one_line(e)})"
        try:
            bad = unsafe_globals(p)
        except Exception as e:  # noqa: BLE001 - a pickle that cannot even be scanned is corrupt
            return f"{p}: unreadable pickle ({one_line(e)})"
        if bad:
            raise CheckpointError(f"{p}: refused: its pickle imports {', '.join(bad[:3])} (not an allow-listed "
                                  f"type; nothing was loaded)")
    return None


def _check_safetensors(tag_dir: str) -> Optional[str]:
    for fname in (CANON_MODEL, CANON_OPTIM):
        p = os.path.join(tag_dir, fname)
        if os.path.exists(p):
            try:
                from safetensors import safe_open

                with safe_open(p, framework="pt") as h:
                    list(h.keys())
            except Exception as e:  # noqa: BLE001 - any header failure means the file is unusable
                return f"{p}: not a readable safetensors file ({one_line(e)})"
    return None


def _check_deepspeed_files(tag_dir: str, names: List[str], world_size: Optional[int],
                           has_manifest: bool) -> Optional[str]:
    mp = sorted(int(m.group(1)) for n in names if (m := MP_FILE.match(n)))
    if not mp:
        return f"{tag_dir}: no mp_rank_XX_model_states.pt"
    if mp != list(range(len(mp))):
        return f"{tag_dir}: model-state files for mp ranks {mp} (a shard is missing)"
    if world_size is not None:
        states = [n for n in names if STATE_FILE.match(n)]
        if len(states) != world_size:
            miss = [w for w in map(state_file_name, range(world_size)) if w not in states]
            detail = f"{miss[0]} missing" if miss else f"{len(states)} trainer_state files"
            if has_manifest:  # every file the save wrote is there: a world-size change, not a corruption
                raise CheckpointError(f"{tag_dir}: written by {len(states)} ranks, this run has {world_size} "
                                      f"({detail}): change the layout with launchers/convert.py reshard")
            return f"{tag_dir}: {len(states)} trainer_state files for a world of {world_size} ({detail})"
    return None


# ---- the config check ----------------------------------------------------------------------------
# Fields that do not change what a run computes; every other field is compared on resume.
_FREE = ("name", "output_dir", "checkpoint.", "logging.", "faults.", "eval.", "schedule.micro_batch_size",
         "data.cache_dir", "data.demo_stories", "data.verify_hash", "parallel.cpu_threads", "model.init_from", "model.init_new_rows",
         "model.attention_backend", "model.embedding_backend", "model.deterministic", "model.recompute",
         "model.recompute_method", "model.recompute_num_layers", "model.recompute_modules",
         "parallel.sequence_parallel")


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, dict):
        out: Dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        out = {f"{prefix}len": len(tree)}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved: Dict[str, Any], cfg: RunConfig, layout_free: bool = False) -> List[str]:
    """Run-changing fields that differ between a checkpoint's config and ``cfg`` (``a.b: old -> new``)."""
    a, b = _flatten(saved), _flatten(cfg.to_dict())
    free = _FREE + (("parallel.",) if layout_free else ())
    out = []
    for k in sorted(set(a) | set(b)):
        if k.startswith(free) or k in free:
            continue
        if a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


# ---- the choice ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Resume:
    tag_dir: str
    meta: Dict[str, Any]
    skipped: List[str]          # newer checkpoints passed over as corrupted


def select_resume(cfg: RunConfig, world_size: int, allow_config_change: bool = False,
                  warn: Callable[[str], None] = print, directory: Optional[str] = None) -> Optional[Resume]:
    """The checkpoint a run resumes from (None: start from scratch), chosen before any model is built
    (the rules: this module's doc)."""
    explicit = directory or cfg.checkpoint.load
    d = os.path.normpath(explicit or os.path.join(cfg.output_dir, "checkpoints"))
    say = warn if _is_rank0() else (lambda *_: None)
    content = cfg.checkpoint.verify_content
    if tag_step(os.path.basename(d)) is not None or is_canonical(d) or os.path.exists(os.path.join(d, META)):
        chosen = _one_named(d, world_size, content)
    else:
        if explicit and not os.path.isdir(d):
            raise CheckpointError(f"checkpoint.load: {d} not found")
        chosen = _newest_intact(d, world_size, say, content)
        if chosen is None:
            return None
    _check_config(chosen, cfg, allow_config_change, bool(explicit), say)
    return chosen


def _one_named(d: str, world_size: int, content: bool) -> Resume:
    if not os.path.isdir(d):
        raise CheckpointError(f"checkpoint.load: {d} not found")
    problem = verify(d, None if is_canonical(d) else world_size, content)
    if problem:
        raise CheckpointError(f"checkpoint.load: {problem}")
    return Resume(d, read_meta(d), [])


def _newest_intact(d: str, world_size: int, say: Callable[[str], None], content: bool) -> Optional[Resume]:
    named = read_latest(d)
    if named is not None and not os.path.isdir(os.path.join(d, named)):
        say(f"warning: {os.path.join(d, LATEST)} names {named!r} but {os.path.join(d, named)} does not exist; "
            f"looking for the newest complete checkpoint instead")
    chosen, skipped, problems = None, [], []
    for _, tag in reversed(complete_tags(d)):
        tdir = os.path.join(d, tag)
        problem = verify(tdir, None if is_canonical(tdir) else world_size, content)
        if problem is None:
            chosen = Resume(tdir, read_meta(tdir), skipped)
            break
        skipped.append(tdir)
        problems.append(problem)
        say(f"warning: checkpoint {tdir} is corrupted ({problem}); trying an older one")
    if chosen is None:
        if skipped:
            raise CheckpointError(f"{d}: no intact checkpoint to resume from ({len(skipped)} corrupted; newest: "
                                  f"{problems[0]}); refusing to restart from scratch over them — move them "
                                  f"away to start afresh")
        return None
    if skipped:
        say(f"warning: resuming from {chosen.tag_dir} instead of the corrupted {skipped[0]} (left as it is)")
    return chosen


def _check_config(chosen: Resume, cfg: RunConfig, allow_config_change: bool, explicit: bool,
                  say: Callable[[str], None]) -> None:
    saved = chosen.meta.get("config")
    if isinstance(saved, dict):
        changes = config_changes(saved, cfg, layout_free=is_canonical(chosen.tag_dir))
        if int(chosen.meta.get("step", -1)) == 0:
            # a step-0 checkpoint (an HF import) is an initialisation: only what shapes the weights must match
            changes = [c for c in changes if c.startswith(("model.", "vocab."))]
        if changes and not allow_config_change:
            hint = " — a layout change needs launchers/convert.py reshard" if any(
                c.startswith("parallel.") for c in changes) else ""
            raise CheckpointError(f"{chosen.tag_dir}: the config differs from the checkpoint's in "
                                  f"{'; '.join(changes)} (pass --allow-config-change to resume anyway{hint})")
        if changes:
            say(f"warning: resuming {chosen.tag_dir} with a changed config ({'; '.join(changes)})")
    elif chosen.meta.get("config_digest") and chosen.meta["config_digest"] != config_digest(cfg) \
            and not allow_config_change and not explicit:
        raise CheckpointError(f"{chosen.tag_dir}: the config digest differs from the checkpoint's "
                              f"({config_digest(cfg)} vs {chosen.meta['config_digest']}; this checkpoint does not "
                              f"record which fields) — pass --allow-config-change to resume anyway")
