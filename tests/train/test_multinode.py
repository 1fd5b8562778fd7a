"""The DeepSpeed hostfile path, executed: two "nodes" (127.0.0.1 and 127.0.0.2, one slot each) reached over a
private sshd through DeepSpeed's default multi-node runner (its ssh check, pdsh, ``--ssh_port``), training
TP=2 across the nodes, and DP=2 under ZeRO-2 across the nodes. Each run's per-step metrics (loss, grad norm,
lr, token counters) and final weights equal those of the same config launched on one node
(``deepspeed --num_gpus 2``).

Skips, saying exactly why, where sshd / ssh / pdsh are missing or the private sshd cannot be started
(.ci/run installs openssh-server and pdsh best effort). Cost: four 2-rank launches (two of them multi-node).
Only loopback addresses are used; gloo is pinned to ``lo`` (forwarded to the remote ranks by a DeepSpeed
env file, the step a user needs for any variable the runner does not export by itself).
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import _loopback_nodes
from _loopback_nodes import LoopbackNodes, NodesUnavailable
from _train_helpers import ROOT, assert_same_weights, launch_env, tiny_config
from tests.distributed import free_port

DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
PRETRAIN = os.path.join(ROOT, "launchers", "pretrain.py")
FORWARD = {"GLOO_SOCKET_IFNAME": "lo"}   # loopback only, on every rank of every launch
SAME = ("step", "stage", "stage_step", "loss", "lr", "grad_norm", "skipped", "step_tokens", "tokens_seen",
        "stage_tokens", "source_tokens")
TIMEOUT = 240


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    n = LoopbackNodes(str(tmp_path_factory.mktemp("nodes")), slots=1, forward_env=FORWARD)
    try:
        n.start()
    except NodesUnavailable as e:
        pytest.skip(f"no loopback 'nodes' for the DeepSpeed hostfile path: {e}")
    yield n
    n.stop()


def _run(cmd, env, nodes=None):
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        if nodes is not None:
            nodes.kill_sessions()   # the remote ranks live under sshd, not in the launcher's process group
        os.killpg(p.pid, 9)
        out, _ = p.communicate()
        pytest.fail(f"launch did not finish within {TIMEOUT} s:\n{out[-4000:]}")
    return p.returncode, out


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(l) for l in f if l.strip()]
    return [{k: r.get(k) for k in SAME} for r in rows if "loss" in r]


def _weights(out_dir):
    ck = os.path.join(out_dir, "checkpoints")
    tag = open(os.path.join(ck, "latest")).read().strip()
    files = sorted(glob.glob(os.path.join(ck, tag, "mp_rank_*_model_states.pt")))
    return tag, {os.path.basename(f): torch.load(f, map_location="cpu", weights_only=True)["module"]
                 for f in files}


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.tensor=2"], ["parallel.zero_stage=2"]], ids=["tp2", "dp2_zero2"])
def test_two_node_hostfile_matches_one_node(nodes, tmp_path, corpus, layout):
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "unused", corpus, checkpoint={"interval": 100},
                      logging={"interval": 1})
    common = ["--no_local_rank", PRETRAIN, "--config", cfg, *layout]
    env = launch_env(FORWARD)

    one = tmp_path / "one_node"
    rc, log = _run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), *common,
                    f"output_dir={one}"], env)
    assert rc == 0, log[-4000:]

    two = tmp_path / "two_nodes"
    rc, log2 = _run([DEEPSPEED, *nodes.launcher_args(), "--master_port", str(free_port()), *common,
                     f"output_dir={two}"], nodes.launcher_env(env), nodes)
    assert rc == 0, f"{log2[-4000:]}\nsshd log: {nodes.log_tail()}"

    # it really went through the hostfile: pdsh ran one launcher per node (its output prefixed by the
    # node's address), node ranks 0 and 1, global ranks 0 on 127.0.0.1 and 1 on 127.0.0.2, the env file
    # exported to the remote shells
    lines = log2.splitlines()
    for i, addr in enumerate(_loopback_nodes.ADDRS):
        assert any(l.startswith(f"{addr}: ") and f"nnodes=2, num_local_procs=1, node_rank={i}" in l
                   for l in lines), log2[-4000:]
    assert "{'127.0.0.1': [0], '127.0.0.2': [1]}" in log2, log2[-4000:]
    assert "export GLOO_SOCKET_IFNAME=lo;" in log2, log2[-4000:]
    # (LogLevel VERBOSE: sshd names the address each connection came in on)
    for addr in _loopback_nodes.ADDRS:
        assert f"on {addr} port {nodes.port}" in nodes.log_tail(10**6), nodes.log_tail()

    ref, got = _metrics(one), _metrics(two)
    assert len(ref) == 8 and ref[-1]["tokens_seen"] == 3 * 256 + 100 + 4 * 256
    assert got == ref
    ref_tag, ref_w = _weights(one)
    tag, w = _weights(two)
    assert tag == ref_tag and w.keys() == ref_w.keys() and w
    for name in ref_w:
        assert_same_weights(w[name], ref_w[name])


def test_missing_sshd_is_a_skip_with_its_reason(tmp_path, monkeypatch):
    """Without sshd (simulated: the lookup finds nothing) the nodes are unavailable and the reason says so."""
    real = _loopback_nodes.which
    monkeypatch.setattr(_loopback_nodes, "which", lambda name: None if name == "sshd" else real(name))
    with pytest.raises(NodesUnavailable, match=r"not installed: sshd \(Debian package openssh-server\)"):
        LoopbackNodes(str(tmp_path)).start()
    assert not os.listdir(tmp_path)   # nothing generated, nothing started
