"""The tiny model trains to the same losses through the Triton kernels (CPU interpreter) and the torch references."""
import os

from tests.distributed import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
# small batch: the interpreter costs ~1 ms per program instance
SMALL = ["schedule.global_batch_size=4", "schedule.micro_batch_size=2", "model.seq_length=64"]


def test_kernels_match_reference_in_training():
    ref = ["model.attention_backend=reference", "model.embedding_backend=reference"]
    tri = ["model.attention_backend=triton", "model.embedding_backend=triton"]
    [res] = run_ranks(1, "tests.workers:losses_for_layouts", TINY, [SMALL + ref, SMALL + tri], 3,
                      env={"TRITON_INTERPRET": "1"})
    r, t = res
    assert r["losses"][-1] < r["losses"][0]
    for a, b in zip(t["losses"], r["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (t["losses"], r["losses"])
    for a, b in zip(t["grad_norms"], r["grad_norms"]):
        assert abs(a - b) <= 1e-4 * abs(b), (t["grad_norms"], r["grad_norms"])


def test_tp2_kernels_match_reference():
    """Vocab-parallel shards through the fused embedding (ids outside the shard give zeros) under TP=2."""
    ref = ["model.attention_backend=reference", "model.embedding_backend=reference", "parallel.tensor=2"]
    tri = ["model.attention_backend=triton", "model.embedding_backend=triton", "parallel.tensor=2"]
    res = run_ranks(2, "tests.workers:losses_for_layouts", TINY, [SMALL + ref, SMALL + tri], 3,
                    env={"TRITON_INTERPRET": "1"})
    r, t = res[0]
    for a, b in zip(t["losses"], r["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b), (t["losses"], r["losses"])


def test_deterministic_flag_reaches_the_embedding_kernel(monkeypatch):
    """model.deterministic -> megatron's deterministic_mode -> the fused embedding's sorted backward."""
    import torch

    import kernels.embedding as ke
    from megaslm.layers import UnitVocabParallelEmbedding

    seen = {}

    def spy(ids, weight, vocab_start=0, **kw):
        seen.update(kw)
        return torch.zeros(*ids.shape, weight.shape[1])

    monkeypatch.setattr(ke, "fused_unit_embedding", spy)
    emb = UnitVocabParallelEmbedding.__new__(UnitVocabParallelEmbedding)
    torch.nn.Module.__init__(emb)
    emb.weight = torch.nn.Parameter(torch.zeros(8, 4))
    emb.vocab_start_index = 0
    emb.deterministic_mode = True
    emb.embedding_force = "reference"
    emb.tp_group = type("G", (), {"size": lambda self: 1})()
    emb.reduce_scatter_embeddings = False   # set by megatron's __init__ (sequence parallelism off)
    emb(torch.zeros(2, 3, dtype=torch.long))
    assert seen["deterministic"] is True and seen["force"] == "reference"


def test_deterministic_config_sets_megatron_mode():
    from megaslm.config_io import load_config
    from megaslm.model import transformer_config

    assert transformer_config(load_config(TINY, ["model.deterministic=true"]), cuda=False).deterministic_mode is True
    assert transformer_config(load_config(TINY), cuda=False).deterministic_mode is False
