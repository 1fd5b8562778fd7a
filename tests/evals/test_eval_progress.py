"""launchers/eval.py reports its progress where it runs (megaslm/progress.py, issue 24 item 2): the scoring and
alignment passes in sequences and the checkpoints, each with its total and an ETA, on rank 0's stderr."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_pass_reports_its_sequences_with_their_total(monkeypatch, capsys):
    from evals.engine import with_progress
    monkeypatch.setenv("MEGASLM_PROGRESS_EVERY", "1e-9")
    assert [b for b in with_progress("scoring", [[0, 1], [2]])] == [[0, 1], [2]]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("eval scoring: 2/3 sequences (66.7%), ") and "ETA" in lines[0]
    assert lines[-1].startswith("eval scoring: 3/3 sequences (100.0%), ") and lines[-1].endswith("done")
    assert len(lines) == 2


def test_the_launcher_takes_progress_every_before_its_checks(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "eval.py"), "--checkpoint",
                        str(tmp_path / "none"), "--progress-every", "5"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "checkpoint or run directory not found" in r.stderr, r.stderr
