"""Which checkpoint a run resumes from (megaslm.checkpoint.select_resume), on planted checkpoint directories:
corruption falls back with a warning naming both, nothing is modified, a malicious pickle is refused
without running, a changed config is refused with the differing fields. No process group needed."""
import hashlib
import json
import os

import pytest
import torch

from megaslm import checkpoint
from megaslm.checkpoint import CheckpointError, TrainState, select_resume
from megaslm.config_io import load_config
from tests.plant import corrupt_mid_member

MARKER_NAME = "pwned-marker"


class Evil:
    """Unpickling this runs ``touch <marker>``: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cfg(out, *extra):
    return load_config(None, [f"output_dir={out}", "schedule.stages.0.train_steps=10", *extra])


def _plant(ckpt_dir, step, cfg, world=1):
    """A checkpoint directory as megaslm.checkpoint.save writes it (small tensors)."""
    d = os.path.join(ckpt_dir, checkpoint.tag_for(step))
    os.makedirs(d)
    torch.save({"module": {"w": torch.full((4,), float(step))}, "lr_scheduler": {"last_epoch": step}},
               os.path.join(d, "mp_rank_00_model_states.pt"))
    torch.save({"optimizer_state_dict": {"base_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(4)}}}}},
               os.path.join(d, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    for r in range(world):
        torch.save({"train_state": TrainState(step=step).to_dict(), "rng": {"torch": torch.get_rng_state()}},
                   os.path.join(d, f"trainer_state_rank{r:05d}.pt"))
    meta = {**TrainState(step=step).to_dict(), "config": cfg.to_dict(), "tag": checkpoint.tag_for(step),
            "files": checkpoint.write_manifest(d)}
    checkpoint.write_json_atomic(os.path.join(d, "meta.json"), meta)
    checkpoint.write_latest(ckpt_dir, checkpoint.tag_for(step))
    return d


def _hashes(root):
    out = {}
    for dp, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dp, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dp, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def run(tmp_path):
    cfg = _cfg(tmp_path / "run")
    ck = str(tmp_path / "run" / "checkpoints")
    dirs = [_plant(ck, s, cfg) for s in (2, 4)]
    return cfg, ck, dirs


def test_intact_newest_is_chosen(run):
    cfg, ck, dirs = run
    warnings = []
    got = select_resume(cfg, 1, warn=warnings.append)
    assert got.tag_dir == dirs[1] and got.skipped == [] and warnings == []
    assert TrainState.from_dict(got.meta).step == 4
    assert select_resume(_cfg(os.path.dirname(ck) + "-fresh"), 1) is None  # nothing there: start from scratch


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_shard", "meta_garbage", "crc", "json_crc"])
def test_corrupted_newest_falls_back(run, damage):
    cfg, ck, (old, new) = run
    f = os.path.join(new, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    if damage == "truncate":
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])
    elif damage == "garbage":
        n = os.path.getsize(f)
        open(f, "wb").write(os.urandom(n))  # same size: the manifest alone cannot tell
    elif damage == "crc":   # same size, zip directory intact: only the members' CRC-32 tells
        corrupt_mid_member(f, nbytes=8)
        assert checkpoint.verify(new, 1, content=False) is None
    elif damage == "json_crc":   # a file without a CRC of its own: against the one meta.json recorded
        extra = os.path.join(new, "notes.json")
        open(extra, "w").write('{"a": 1}')
        meta = json.load(open(os.path.join(new, "meta.json")))
        meta["files"], meta["crc32"] = checkpoint.write_manifest(new), checkpoint.record_crc32(new)
        checkpoint.write_json_atomic(os.path.join(new, "meta.json"), meta)
        open(extra, "w").write('{"a": 2}')
    elif damage == "missing_shard":
        os.remove(os.path.join(new, "trainer_state_rank00000.pt"))
    else:
        open(os.path.join(new, "meta.json"), "w").write("{not json")
    before = _hashes(ck)
    warnings = []
    got = select_resume(cfg, 1, warn=warnings.append)
    assert got.tag_dir == old and got.skipped == [new]
    assert any(new in w and "corrupted" in w for w in warnings), warnings
    assert any(old in w and new in w for w in warnings), warnings  # one warning names both
    assert all("\n" not in w for w in warnings)
    assert _hashes(ck) == before  # nothing modified, moved or removed


def test_all_corrupted_refuses_instead_of_restarting(run):
    cfg, ck, dirs = run
    for d in dirs:
        os.remove(os.path.join(d, "mp_rank_00_model_states.pt"))
    before = _hashes(ck)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from \(2 corrupted; newest: .*step00000004"):
        select_resume(cfg, 1, warn=lambda *_: None)
    assert _hashes(ck) == before


def test_latest_naming_a_missing_directory_warns(run):
    cfg, ck, dirs = run
    checkpoint.write_latest(ck, "step00000099")
    warnings = []
    got = select_resume(cfg, 1, warn=warnings.append)
    assert got.tag_dir == dirs[1]
    assert len(warnings) == 1 and "names 'step00000099'" in warnings[0] and "does not exist" in warnings[0]


def test_world_size_mismatch_is_a_missing_shard(run):
    cfg, ck, dirs = run
    with pytest.raises(CheckpointError, match="trainer_state_rank00001.pt missing"):
        select_resume(cfg, 2, warn=lambda *_: None)


@pytest.mark.parametrize("kind", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "trainer_state_rank00000.pt"])
def test_malicious_pickle_refused_and_never_run(run, tmp_path, kind):
    cfg, ck, (old, new) = run
    marker = tmp_path / MARKER_NAME
    path = os.path.join(new, kind)
    torch.save({"module": {}, "payload": Evil(str(marker))}, path)
    meta = json.load(open(os.path.join(new, "meta.json")))
    meta["files"] = checkpoint.write_manifest(new)  # an attacker who also fixes the manifest
    checkpoint.write_json_atomic(os.path.join(new, "meta.json"), meta)
    with pytest.raises(CheckpointError) as e:
        select_resume(cfg, 1, warn=lambda *_: None)
    msg = str(e.value)
    assert path in msg and "refused" in msg and "posix.system" in msg and "\n" not in msg
    # every loader refuses it too, without running it
    with pytest.raises(CheckpointError, match="refused by torch.load"):
        checkpoint.safe_load(path)
    assert not marker.exists()


def test_config_change_refused_with_fields(run):
    cfg, ck, dirs = run
    changed = _cfg(os.path.dirname(ck), "optimizer.lr=0.01", "model.hidden_size=128", "logging.interval=7")
    with pytest.raises(CheckpointError) as e:
        select_resume(changed, 1, warn=lambda *_: None)
    msg = str(e.value)
    assert "optimizer.lr: 0.0005 -> 0.01" in msg and "model.hidden_size: 64 -> 128" in msg
    assert "logging" not in msg and "--allow-config-change" in msg and "\n" not in msg
    warnings = []
    got = select_resume(changed, 1, allow_config_change=True, warn=warnings.append)
    assert got.tag_dir == dirs[1] and "optimizer.lr" in warnings[0]
    # a run that only changes what does not alter the computation resumes silently
    same = _cfg(os.path.dirname(ck), "logging.interval=7", "checkpoint.keep_last=9", "eval.interval=3",
                "data.verify_hash=false", "checkpoint.verify_content=false")
    assert select_resume(same, 1, warn=lambda *_: None).tag_dir == dirs[1]


def test_step0_import_only_compares_the_model(tmp_path):
    """A step-0 checkpoint (an HF import) is an initialisation: a new schedule / lr / data is the point."""
    src = _cfg(tmp_path / "imp", "optimizer.lr=0.001")
    ck = str(tmp_path / "imp" / "checkpoints")
    d = _plant(ck, 0, src)
    new = _cfg(tmp_path / "new", "optimizer.lr=0.02", "schedule.warmup_steps=0", f"checkpoint.load={ck}")
    assert select_resume(new, 1, warn=lambda *_: None).tag_dir == d
    with pytest.raises(CheckpointError, match="model.num_layers: 2 -> 4"):
        select_resume(_cfg(tmp_path / "new", "model.num_layers=4", f"checkpoint.load={ck}"), 1)


def test_explicit_checkpoint_load_never_falls_back(run):
    cfg, ck, (old, new) = run
    os.remove(os.path.join(new, "mp_rank_00_model_states.pt"))
    explicit = _cfg(os.path.dirname(ck), f"checkpoint.load={new}")
    with pytest.raises(CheckpointError, match=r"checkpoint.load: .*step00000004.*missing"):
        select_resume(explicit, 1, warn=lambda *_: None)
