"""The README's main-job command, run in a fresh copy of the repository: exit 0, a checkpoint, a falling loss."""
import json
import os
import re
import shutil
import subprocess
import sys

from megaslm.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_command(marker):
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)\n```", text, re.S)
    assert m, f"README has no <!-- {marker} --> code block"
    return m.group(1).strip()


def fresh_copy(dest):
    """The repository as a clone would have it: tracked files plus untracked, non-ignored ones."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        src = os.path.join(ROOT, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, f))


def test_readme_test_command_is_what_ci_runs():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert readme_command("tests") in ci


def test_readme_main_job(tmp_path):
    cmd = readme_command("main-job")
    # the set-up part installs into .venv; this test runs in the already-installed environment, so it
    # runs the command's last step (the job itself) with .venv/bin/ pointing at this interpreter's bin
    job = cmd.split("&&")[-1].strip()
    assert job.startswith(".venv/bin/deepspeed launchers/pretrain.py"), job
    bindir = os.path.dirname(sys.executable)
    job = job.replace(".venv/bin/", bindir + "/")
    # the command as written uses DeepSpeed's default rendezvous port 29500; other tests run beside this one, so
    # it gets a free port (the run refused "port 29500 already in use" when a launcher test held it)
    job = job.replace("deepspeed launchers/pretrain.py", f"deepspeed --master_port {free_port()} launchers/pretrain.py")
    repo = tmp_path / "clone"
    fresh_copy(str(repo))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(job, shell=True, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = repo / "runs" / "tiny"
    assert (run / "config.yaml").exists()
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").exists()
    tag = (ckpts / "latest").read_text().strip()
    assert any(f.endswith("model_states.pt") for f in os.listdir(ckpts / tag))
    losses = [json.loads(l)["loss"] for l in open(run / "metrics.jsonl")]
    assert losses[-1] < losses[0] - 1.0, (losses[0], losses[-1])
