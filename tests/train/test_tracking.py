"""Experiment tracking in wandb (megaslm/tracking.py), offline: no network, every file under tmp_path.

A tiny run logs what metrics.jsonl holds at the same steps, and its resolved config; a resumed run continues
the same wandb run id; ``logging.wandb: true`` without wandb installed is one config error line."""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from _train_helpers import ROOT, launch_env, tiny_config


def wandb_records(path):
    """The records of an offline run's transaction log (``run-<id>.wandb``): a 7-byte header (``:W&B``,
    magic, version), then LevelDB-log blocks of 32 KiB whose records (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last) carry protobuf ``Record`` messages. Read here because wandb >= 0.19 dropped its Python
    reader (``wandb.sdk.internal.datastore``) and ``wandb sync`` needs a server."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", data[:7]
    pos, part, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:          # block trailer or padding: the next block
            pos += left
            continue
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            out.append(rec)
            part = b""
    return out


def read_offline_run(path):
    """(run id, config {key: value}, history {step: {name: value}}) of one offline run file."""
    run_id, config, history = None, {}, {}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run_id = rec.run.run_id
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(rec.history.step.num, {}).update(row)
    return run_id, config, history


def _env(tmp_path):
    """A launch's environment: wandb offline, every wandb file under ``tmp_path``."""
    wb = str(tmp_path / "wandb-home")
    env = {k: v for k, v in launch_env().items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), WANDB_MODE="offline", WANDB_DIR=wb,
               WANDB_CONFIG_DIR=wb, WANDB_CACHE_DIR=wb, WANDB_DATA_DIR=wb, WANDB_SILENT="true")
    return env


def _launch(tmp_path, cfg, out, *extra):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), "--config", cfg,
                        f"output_dir={out}", *extra], env=_env(tmp_path), cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]


def _config(tmp_path, corpus_en, stages=1):
    """The tests' tiny run, 1 layer, 4 sequences per step: 3 steps, then (``stages=2``) a second stage of 2."""
    stage_list = [{"name": "en", "train_steps": 3, "data": [{"path": corpus_en, "weight": 1.0}]},
                  {"name": "more", "train_steps": 2, "data": [{"path": corpus_en, "weight": 1.0}]}][:stages]
    return tiny_config(tmp_path / f"c{stages}.yaml", tmp_path / "run", None, stages=stage_list, name="wb",
                       model={"num_layers": 1}, schedule={"global_batch_size": 4}, checkpoint={"interval": 0},
                       logging={"interval": 100, "wandb": True, "wandb_mode": "offline",
                                "wandb_project": "megaslm-test", "wandb_tags": ["ci"]})


def test_offline_run_logs_metrics_config_and_resumes_the_same_run(tmp_path, corpus):
    cfg, out = _config(tmp_path, corpus["en"]), str(tmp_path / "run")
    _launch(tmp_path, cfg, out)
    run_id = open(os.path.join(out, "wandb_run_id")).read().strip()
    # resumed from step 3's checkpoint with a second stage of 2 steps (a schedule change: allowed explicitly)
    _launch(tmp_path, _config(tmp_path, corpus["en"], stages=2), out, "--allow-config-change")
    assert open(os.path.join(out, "wandb_run_id")).read().strip() == run_id

    files = sorted(glob.glob(str(tmp_path / "wandb-home" / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2, files
    runs = [read_offline_run(f) for f in files]
    assert [r[0] for r in runs] == [run_id, run_id]
    history = {}
    for _, _, h in runs:
        history.update(h)
    metrics = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    for m in metrics:
        row = history[m["step"]]
        assert row["train/loss"] == m["loss"] and row["train/lr"] == m["lr"], (row, m)
        assert row["train/tokens_seen"] == m["tokens_seen"] and row["train/stage_tokens"] == m["stage_tokens"]
    config = runs[1][1]
    assert config["model"]["num_layers"] == 1 and [st["name"] for st in config["schedule"]["stages"]] == ["en", "more"]
    assert config["logging"]["wandb"] is True and config["name"] == "wb"


def test_wandb_missing_is_one_config_error_before_anything(tmp_path):
    """wandb hidden (``sys.modules['wandb'] = None``): the launcher stops at the config check, exit 2, one line."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("logging:\n  wandb: true\n")
    code = ("import runpy, sys; sys.modules['wandb'] = None; sys.path.insert(0, 'launchers'); "
            "sys.argv = ['pretrain.py', '--config', sys.argv[1], "
            f"'output_dir={tmp_path / 'run'}']; runpy.run_path('launchers/pretrain.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code, str(cfg)], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and 'logging.wandb' in lines[0] and 'pip install -e ".[wandb]"' in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_wandb_mode_is_checked():
    from megaslm.config import ConfigError, RunConfig

    cfg = RunConfig()
    cfg.logging.wandb_mode = "onlin"
    with pytest.raises(ConfigError, match="logging.wandb_mode: expected online, offline or disabled"):
        cfg.logging.validate()
    cfg.logging.wandb_mode = None   # unset: wandb's own choice ($WANDB_MODE, else online)
    cfg.logging.validate()


def test_evaluation_records_reach_the_same_run(tmp_path, monkeypatch):
    """What the trainer's sink writes at an evaluation (``{"step", "eval": {...}}``) is logged at that step beside
    the step's own record, under TensorBoard's names (in-process: one wandb run, no trainer)."""
    from megaslm import telemetry, tracking
    from megaslm.config import RunConfig

    for k, v in _env(tmp_path).items():
        if k.startswith("WANDB_"):
            monkeypatch.setenv(k, v)
    cfg = RunConfig(output_dir=str(tmp_path / "run"))
    cfg.logging.wandb = True   # logging.wandb_mode unset: wandb's own choice, here $WANDB_MODE=offline
    sink = telemetry.MetricsSink(cfg.output_dir, tracker=tracking.open_tracker(cfg))
    sink.write({"step": 2, "loss": 1.5, "skipped": False, "mfu": None, "source_tokens": {"en": 7}})
    sink.write({"step": 2, "eval": {"sSC_en": 0.75, "tSC_fr": 0.5}})
    sink.close()
    (path,) = glob.glob(str(tmp_path / "wandb-home" / "wandb" / "offline-run-*" / "run-*.wandb"))
    run_id, _, history = read_offline_run(path)
    assert run_id == open(os.path.join(cfg.output_dir, "wandb_run_id")).read().strip()
    row = {k: v for k, v in history[2].items() if not k.startswith("_")}
    assert row == {"train/loss": 1.5, "source_tokens/en": 7, "eval/sSC_en": 0.75, "eval/tSC_fr": 0.5}, row
