"""Resume through the launcher (launchers/pretrain.py) over damaged or planted checkpoints: a newest one
corrupted in place (same size) falls back and ends bit-identical, a malicious pickle is refused with one line (exit 2) and never runs, a
changed config is refused unless --allow-config-change; a disk full during a save is one line and the
resume after it is exact; DeepSpeed's own load path is safe; a checkpoint's
learning rate never overrides the current schedule's."""
import glob
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests.plant import corrupt_mid_member

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hashes(root):
    out = {}
    for dp, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dp, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dp, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _launch(cfg, out, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK",
                                                            "TRITON_INTERPRET")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), "--config", cfg,
                        f"output_dir={out}", *extra], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout, p.stderr


def _weights(tag_dir):
    return torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=True)["module"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from data_tools.synthetic import write_demo_corpus

    work = tmp_path_factory.mktemp("resume")
    corpus = write_demo_corpus(str(work / "corpus"), seed=3, num_stories=40, codebook_size=128)
    cfg = {
        "name": "t", "seed": 7, "precision": "fp32",
        "model": {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
                  "num_query_groups": 2, "seq_length": 32, "attention_backend": "reference",
                  "embedding_backend": "reference"},
        "vocab": {"codebook_size": 128, "languages": ["en", "fr"]},
        "parallel": {"tensor": 1, "pipeline": 1, "zero_stage": 1},
        "optimizer": {"lr": 3e-3, "clip_grad": 1.0},
        "schedule": {"micro_batch_size": 2, "global_batch_size": 8, "warmup_fraction": 0.1,
                     "stages": [{"name": "en", "train_steps": STEPS, "data": [{"path": corpus["en"], "weight": 1.0}]}]},
        "checkpoint": {"interval": 2, "keep_last": 3},
        "logging": {"interval": 100},
    }
    path = str(work / "c.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    ref = str(work / "ref")
    rc, out, err = _launch(path, ref)
    assert rc == 0, (out + err)[-3000:]
    return {"cfg": path, "ref": ref, "ref_w": _weights(os.path.join(ref, "checkpoints", "step00000006"))}


def _copy(base, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(base["ref"], dst)
    return dst, os.path.join(dst, "checkpoints")


def test_corrupted_newest_falls_back_and_ends_identical(base, tmp_path):
    """A same-size corruption mid-shard (zip directory intact: sizes and zip checks pass it, and its garbage
    weights would load) is found by the CRC check; the run falls back and ends bit-identical."""
    from megaslm.checkpoint.resume import verify

    run, ck = _copy(base, tmp_path)
    newest, older = os.path.join(ck, "step00000006"), os.path.join(ck, "step00000004")
    f = os.path.join(newest, "mp_rank_00_model_states.pt")
    size = os.path.getsize(f)
    member = corrupt_mid_member(f)
    assert os.path.getsize(f) == size and verify(newest, 1, content=False) is None  # the planted failure is real
    assert f"member {member} fails its CRC-32" in verify(newest, 1)
    before = _hashes(newest)
    rc, out, err = _launch(base["cfg"], run)
    log = out + err
    assert rc == 0, log[-3000:]
    assert f"resuming from {older} instead of the corrupted {newest}" in log, log[-3000:]
    assert f"resumed from {older} at step 4" in log
    kept = glob.glob(newest + ".corrupt-*")
    assert len(kept) == 1 and _hashes(kept[0]) == before  # moved aside by the new save, never overwritten
    new_w = _weights(newest)
    for k, v in base["ref_w"].items():
        if torch.is_tensor(v) and v.is_floating_point():
            assert torch.equal(new_w[k], v), k


def test_malicious_trainer_state_refused_by_the_launcher(base, tmp_path):
    run, ck = _copy(base, tmp_path)
    marker = tmp_path / "pwned"
    path = os.path.join(ck, "step00000006", "trainer_state_rank00000.pt")
    torch.save({"train_state": {"step": 6}, "rng": Evil(str(marker))}, path)
    before = _hashes(ck)
    rc, out, err = _launch(base["cfg"], run)
    assert rc == 2, (out + err)[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}: refused") and "posix.system" in last, err[-2000:]
    assert not marker.exists()
    assert _hashes(ck) == before


def _pages(root):
    return sum(-(-os.path.getsize(os.path.join(dp, f)) // 4096) * 4096 for dp, _, fs in os.walk(root) for f in fs)


def test_disk_full_during_a_save(base, tmp_path):
    """The run directory on a small tmpfs that holds the run and half a checkpoint: the save of step 6 runs
    out of space. One line names the filesystem and the bytes needed (exit 2), the partial .tmp is removed
    (a leftover would keep the disk full), step 4 stays intact; with room again the resume ends
    bit-identical."""
    fs = tmp_path / "fs"
    fs.mkdir()
    run = fs / "run"
    no6 = shutil.ignore_patterns("step00000006")   # the run as killed after the save of step 4
    shutil.copytree(base["ref"], run, ignore=no6)
    ck = run / "checkpoints"
    (ck / "latest").write_text("step00000004")
    one = _pages(ck / "step00000004")
    need = _pages(run) + one // 2
    shutil.rmtree(run)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={need}", "tmpfs", str(fs)], capture_output=True,
                           text=True, timeout=30)
    except OSError as e:
        pytest.skip(f"cannot run mount ({e}): the disk-full test plants a small tmpfs")
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here ({r.stderr.strip()}): the disk-full test needs root")
    try:
        shutil.copytree(base["ref"], run, ignore=no6)
        (ck / "latest").write_text("step00000004")
        before = _hashes(ck / "step00000004")
        rc, out, err = _launch(base["cfg"], str(run))
        assert rc == 2, (out + err)[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: checkpoint save at step 6: no space left on {fs} (tmpfs, "), err[-3000:]
        one_bytes = sum(os.path.getsize(ck / "step00000004" / f) for f in os.listdir(ck / "step00000004"))
        assert f"a checkpoint takes {one_bytes:,} bytes (as step00000004 does)" in last, last
        assert "removed the partial step00000006.tmp" in last and "step00000004, is intact" in last
        assert "Traceback" not in err, err[-3000:]
        assert sorted(os.listdir(ck)) == sorted(set(os.listdir(os.path.join(base["ref"], "checkpoints")))
                                                - {"step00000006"})   # no .tmp left
        assert _hashes(ck / "step00000004") == before and (ck / "latest").read_text() == "step00000004"
        subprocess.run(["mount", "-o", f"remount,size={need + 4 * one}", str(fs)], check=True, timeout=30)
        rc, out, err = _launch(base["cfg"], str(run))
        assert rc == 0 and "resumed from" in out + err, (out + err)[-3000:]
        new_w = _weights(str(ck / "step00000006"))
        for k, v in base["ref_w"].items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.equal(new_w[k], v), k
    finally:
        subprocess.run(["umount", str(fs)], capture_output=True, timeout=30)


def test_config_change_refused_unless_allowed(base, tmp_path):
    run, ck = _copy(base, tmp_path)
    rc, out, err = _launch(base["cfg"], run, "optimizer.lr=0.001", "schedule.stages.0.train_steps=8")
    assert rc == 2, (out + err)[-3000:]
    last = err.strip().splitlines()[-1]
    assert "optimizer.lr: 0.003 -> 0.001" in last and "schedule.stages.0.train_steps: 6 -> 8" in last, last
    assert "--allow-config-change" in last
    assert sorted(os.listdir(ck)) == sorted(os.listdir(os.path.join(base["ref"], "checkpoints")))
    rc, out, err = _launch(base["cfg"], run, "optimizer.lr=0.001", "schedule.stages.0.train_steps=8",
                           "--allow-config-change")
    assert rc == 0, (out + err)[-3000:]
    assert "resumed from" in out + err and os.path.isdir(os.path.join(ck, "step00000008"))


# ---- in a process group: DeepSpeed's own load path, and the lr after a resume ---------------------
def engine_load_worker(work, marker):
    """A Trainer at lr 1e-3 saves step 0; (1) the same checkpoint with a planted model-states pickle
    is refused by DeepSpeed's load path itself (no select_resume in front); (2) a Trainer with another
    schedule (lr 5e-3, constant) resumes the intact step-0 checkpoint: its first step uses 5e-3."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm import checkpoint, parallel
    from megaslm.checkpoint import CheckpointError
    from megaslm.config_io import load_config
    from megaslm.train import Trainer

    base = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.seq_length=32",
            "schedule.global_batch_size=4", "schedule.micro_batch_size=2", "precision=fp32", "data.demo=true",
            "schedule.stages.0.train_steps=10"]
    torch.set_num_threads(1)
    cfg = load_config(None, base + [f"output_dir={work}/a", "optimizer.lr=1e-3", "schedule.warmup_steps=4"])
    t = Trainer(cfg, log=lambda *_: None)
    lr_import = t.scheduler.optimizer.param_groups[0]["lr"]
    tag_dir = t.save()
    bad = f"{work}/bad/step00000000"
    shutil.copytree(tag_dir, bad)
    torch.save({"module": {}, "payload": Evil(marker)}, os.path.join(bad, "mp_rank_00_model_states.pt"))
    refused = ""
    try:
        checkpoint.load(t.engine, bad)
    except CheckpointError as e:
        refused = str(e)
    ps.destroy_model_parallel()
    del t
    cfg2 = load_config(None, base + [f"output_dir={work}/b", "optimizer.lr=5e-3", "schedule.warmup_steps=0",
                                     "schedule.decay=constant"])
    t2 = Trainer(cfg2, log=lambda *_: None)
    loaded = t2.load(os.path.dirname(tag_dir))
    out = {"refused": refused, "lr_import": lr_import, "loaded": loaded,
           "lr_first": t2.scheduler.optimizer.param_groups[0]["lr"], "last_lr": t2.scheduler.get_last_lr()[0]}
    dist.barrier()
    ps.destroy_model_parallel()
    parallel.destroy()
    return out


def test_deepspeed_load_path_is_safe_and_lr_follows_the_new_schedule(tmp_path):
    sys.path.insert(0, ROOT)
    from tests.distributed import run_ranks

    marker = tmp_path / "pwned"
    (res,) = run_ranks(1, "tests.test_checkpoint_resume:engine_load_worker", str(tmp_path), str(marker))
    assert "mp_rank_00_model_states.pt: refused by torch.load(weights_only=True)" in res["refused"]
    assert "\n" not in res["refused"] and not marker.exists()
    assert res["loaded"] and res["lr_import"] == pytest.approx(1e-3 / 4)
    assert res["lr_first"] == 5e-3 and res["last_lr"] == 5e-3


def zero0_reshard_worker(work):
    """ZeRO-0 run (torch AdamW state per parameter): 2 steps, save. Offline: its moments equal the
    optimizer's. Reshard to canonical; resume the original (ZeRO-0), the canonical one at ZeRO-0 and at
    ZeRO-2; one more step each."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaslm import parallel, sharding
    from megaslm.checkpoint import Checkpoint
    from megaslm.config_io import load_config
    from megaslm.interop.reshard import reshard
    from megaslm.train import Trainer
    from tests.workers import fixed_batch

    base = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.seq_length=32",
            "schedule.global_batch_size=4", "schedule.micro_batch_size=2", "precision=fp32", "data.demo=true",
            "schedule.stages.0.train_steps=10", "schedule.warmup_steps=1", "optimizer.lr=3e-3"]
    torch.set_num_threads(1)
    cfg = load_config(None, base + [f"output_dir={work}/a", "parallel.zero_stage=0"])
    t = Trainer(cfg, log=lambda *_: None)
    for s in range(2):
        t.train_step(fixed_batch(cfg, seed=s))
        t.step += 1
        t.stage_step += 1
    live = {}
    opt = t.engine.optimizer
    for _, p, spec in sharding.iter_params(t.chunks, cfg):
        live[spec.canonical] = opt.state[p]["exp_avg_sq"].clone()
    path = t.save()
    ps.destroy_model_parallel()
    del t
    moments, step = Checkpoint(path).optimizer_state()
    same = all(torch.equal(moments["exp_avg_sq"][k], v) for k, v in live.items()) and moments["exp_avg_sq"].keys() == live.keys()
    if dist.get_rank() == 0:
        reshard(path, f"{work}/canon", ["parallel.zero_stage=2"])
    dist.barrier()
    losses = {}
    for name, zero, src in (("orig", 0, path), ("canon0", 0, f"{work}/canon/checkpoints"),
                            ("canon2", 2, f"{work}/canon/checkpoints")):
        c = load_config(None, base + [f"output_dir={work}/{name}", f"parallel.zero_stage={zero}"])
        t = Trainer(c, log=lambda *_: None)
        assert t.load(src)
        losses[name] = [t.train_step(fixed_batch(c, seed=s))["loss"] for s in (2, 3)]
        ps.destroy_model_parallel()
        del t
    parallel.destroy()
    return {"same_moments": same, "adam_step": step, "losses": losses}


def test_zero0_moments_read_and_resumed(tmp_path):
    sys.path.insert(0, ROOT)
    from tests.distributed import run_ranks

    (res,) = run_ranks(1, "tests.test_checkpoint_resume:zero0_reshard_worker", str(tmp_path))
    assert res["same_moments"] and res["adam_step"] == 2.0
    assert res["losses"]["canon0"] == res["losses"]["orig"]  # same layout: bit-identical
    for got, ref in zip(res["losses"]["canon2"], res["losses"]["orig"]):
        assert got == pytest.approx(ref, rel=1e-6)
