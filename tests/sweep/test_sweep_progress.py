"""A sweep reports the runs done of those it started, with their total and an ETA (megaslm/progress.py,
issue 24 item 2), a failed run included; what it starts inherits --progress-every."""
from helpers import sweep, tiny_spec

import megaslm.sweeps.execute as execute
from megaslm.config import ConfigError
from megaslm.sweeps.expand import expand
from megaslm.sweeps.state import write_configs


def test_runs_done_with_their_total(tmp_path, monkeypatch, capsys):
    sw = expand(tiny_spec(tmp_path))
    write_configs(sw)
    ran = []

    def fake_run(sweep_json, name, *a):
        ran.append(name)
        if len(ran) == 2:
            raise ConfigError("boom")

    monkeypatch.setattr(execute, "execute_run", fake_run)
    monkeypatch.setenv("MEGASLM_PROGRESS_EVERY", "1e-9")
    results = execute.run_all(sw, sw.runs, log=lambda m: None)
    n = len(sw.runs)
    assert len(ran) == n >= 3 and list(results.values()).count("boom") == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith(f"sweep tiny-test: 1/{n} runs ({100 / n:.1f}%), ") and "ETA" in lines[0]
    assert lines[-1].startswith(f"sweep tiny-test: {n}/{n} runs (100.0%)") and lines[-1].endswith("done")


def test_the_launcher_takes_progress_every(tmp_path):
    r = sweep("plan", "--spec", tiny_spec(tmp_path), "--progress-every", "5")
    assert r.returncode == 0, r.stderr
    assert sweep("plan", "--spec", tiny_spec(tmp_path), "--progress-every", "soon").returncode == 2
