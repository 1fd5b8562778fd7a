"""The README runs as written: every ```bash block, in order, in one fresh copy of the repository (tracked and
untracked non-ignored files), each command must exit 0; the main job must leave a checkpoint and a falling loss.

What the test changes, and only this:
  * the set-up (``python3 -m venv .venv && pip install ...``) is what CI has just run: the copy's ``.venv`` is this
    interpreter's environment, and the main-job block runs from its last ``&&`` step (``readme-test: after-setup``);
  * rendezvous ports: ``deepspeed`` gets ``--master_port N``, ``torchrun`` ``--master-port N`` and single
    processes ``MASTER_PORT=N`` with N free (other tests run beside this one);
  * a block preceded by ``<!-- readme-test: append ARGS -->`` gets ARGS at the end of each of its ``launchers/``
    commands (the smaller sizes the README names there; a benchmark's ``--results`` inside the copy: megaslm is
    imported from the checkout under test, whose docs/bench/ must stay as it is), ``<!-- readme-test: skip: REASON -->`` is not run (the
    test command itself, a second node, a GPU), the README saying why next to the block.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

from megaslm.ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def readme_command(marker):
    text = open(README).read()
    m = re.search(rf"<!-- {marker} -->\s*(?:<!--.*?-->\s*)*```bash\n(.*?)\n```", text, re.S)
    assert m, f"README has no <!-- {marker} --> code block"
    return m.group(1).strip()


def readme_blocks():
    """[(line, directives, [(line, command)])] for every ```bash block of the README, in order. Directives: the
    ``readme-test:`` comments right above the block; commands: its non-comment lines, continuations joined."""
    lines = open(README).read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        directives, j = [], i - 1
        while j >= 0 and lines[j].strip().startswith("<!--") and lines[j].strip().endswith("-->"):
            m = re.match(r"<!--\s*readme-test:\s*(.*?)\s*-->", lines[j].strip())
            if m:
                directives.append(m.group(1))
            j -= 1
        start, cmds, cur, cur_line = i + 1, [], "", None
        i += 1
        while lines[i].strip() != "```":
            ln = lines[i]
            if cur_line is None:
                cur_line = i + 1
            cur += ln.rstrip("\\").rstrip() + " " if ln.rstrip().endswith("\\") else ln
            if not ln.rstrip().endswith("\\"):
                if cur.strip() and not cur.strip().startswith("#"):
                    cmds.append((cur_line, cur.strip()))
                cur, cur_line = "", None
            i += 1
        blocks.append((start, directives, cmds))
        i += 1
    return blocks


def fresh_copy(dest):
    """The repository as a clone would have it: tracked files plus untracked, non-ignored ones."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        src = os.path.join(ROOT, f)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, f))


def as_run(cmd, directives, port):
    """The command as this test runs it (module docstring)."""
    if "after-setup" in directives:
        cmd = cmd.split("&&")[-1].strip()
    cmd = re.sub(r"(^|/)deepspeed ", rf"\1deepspeed --master_port {port} ", cmd, count=1)
    cmd = re.sub(r"(^|/)torchrun ", rf"\1torchrun --master-port {port} ", cmd, count=1)
    for d in directives:
        if d.startswith("append ") and "launchers/" in cmd:
            code, sep, comment = cmd.partition("  #")     # before a trailing comment
            cmd = f"{code.rstrip()} {d[len('append '):]}" + (f"  #{comment}" if sep else "")
    return cmd


def test_readme_test_command_is_what_ci_runs():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert readme_command("tests") in ci


def test_readme_blocks_are_parsed_with_their_directives():
    blocks = readme_blocks()
    assert len(blocks) >= 10
    first = blocks[0]
    assert first[1] == ["after-setup"] and first[2][0][1].startswith("python3 -m venv .venv")
    assert as_run(first[2][0][1], first[1], 1234) == ".venv/bin/deepspeed --master_port 1234 launchers/pretrain.py"
    assert any(d.startswith("skip: ") for d in blocks[1][1]), blocks[1]      # the test command: not run in here
    assert as_run(".venv/bin/torchrun --nproc-per-node 2 -m data_tools x", [], 7) == \
        ".venv/bin/torchrun --master-port 7 --nproc-per-node 2 -m data_tools x"
    assert as_run(".venv/bin/python launchers/sweep.py plan --spec s.yaml   # params", ["append seeds=[1]"], 7) == \
        ".venv/bin/python launchers/sweep.py plan --spec s.yaml seeds=[1]  # params"
    # a continuation line joins its command
    multi = [c for _, d, cs in blocks for _, c in cs if "--hostfile" in c]
    assert multi and "launchers/pretrain.py" in multi[0]


def test_readme_runs_as_written(tmp_path):
    repo = tmp_path / "clone"
    fresh_copy(str(repo))
    os.symlink(sys.prefix, repo / ".venv")          # the documented set-up, as CI has just run it
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    status = lambda: subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout
    before = status()
    ran = 0
    for _, directives, cmds in readme_blocks():
        if any(d.startswith("skip: ") for d in directives):
            continue
        for line, cmd in cmds:
            port = free_port()
            run = as_run(cmd, directives, port)
            t0 = time.time()
            r = subprocess.run(["bash", "-c", run], cwd=repo, env=dict(env, MASTER_PORT=str(port)),
                               capture_output=True, text=True, timeout=900)
            print(f"README.md:{line}: {time.time() - t0:.1f} s: {run}")
            assert r.returncode == 0, (f"README.md:{line}: `{cmd}` (run as `{run}`) exited {r.returncode}\n"
                                       + r.stdout[-3000:] + r.stderr[-3000:])
            ran += 1
            if "after-setup" in directives:           # the main job
                run_dir = repo / "runs" / "tiny"
                ckpts = run_dir / "checkpoints"
                tag = (ckpts / "latest").read_text().strip()
                assert any(f.endswith("model_states.pt") for f in os.listdir(ckpts / tag))
                losses = [json.loads(l)["loss"] for l in open(run_dir / "metrics.jsonl")]
                assert losses[-1] < losses[0] - 1.0, (losses[0], losses[-1])
    assert ran >= 20, ran
    # nothing was written into the checkout under test (megaslm is imported from it: a benchmark record defaults to
    # its docs/bench/, which is why the README test gives bench_trainer_cpu a --results inside the copy)
    assert status() == before, "README commands wrote into the checkout:\n" + status()


def readme_transcripts():
    """[(line, command, expected exit status, expected output lines)] for every ``$ command`` of the README's
    plain ``` blocks (a transcript: what a command prints, ``...`` for lines left out, ``# exit N`` when not 0)."""
    lines, out, i, fence, plain = open(README).read().splitlines(), [], 0, False, False
    while i < len(lines):
        s = lines[i].strip()
        if s.startswith("```"):
            fence, plain = not fence, not fence and s == "```"
            i += 1
            continue
        if plain and lines[i].startswith("$ "):
            cmd, _, comment = lines[i][2:].partition("  #")
            m = re.search(r"exit (\d+)", comment)
            expected, j = [], i + 1
            while j < len(lines) and not lines[j].startswith("$ ") and lines[j].strip() != "```":
                if lines[j].strip() not in ("", "..."):
                    expected.append(lines[j].strip())
                j += 1
            out.append((i + 1, cmd.strip(), int(m.group(1)) if m else 0, expected))
            i = j
            continue
        i += 1
    return out


def test_readme_transcripts_print_what_they_show():
    """The README's transcripts are true: each ``$`` command exits as shown and prints every line shown."""
    ts = readme_transcripts()
    assert len(ts) >= 2
    for line, cmd, status, expected in ts:
        r = subprocess.run(["bash", "-c", cmd.replace(".venv/bin/", os.path.dirname(sys.executable) + "/")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        got = [ln.strip() for ln in (r.stdout + r.stderr).splitlines()]
        assert r.returncode == status, f"README.md:{line}: `{cmd}` exited {r.returncode}, the README says {status}"
        missing = [e for e in expected if e not in got]
        assert not missing, f"README.md:{line}: `{cmd}` did not print {missing[:3]}; it printed:\n" + "\n".join(got)
