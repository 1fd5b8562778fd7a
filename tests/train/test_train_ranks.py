"""Two ranks over gloo (one spawned group for every case): exact budgets and stage transition on DP=2,
per-source token accounting, TensorBoard files, NaN stop / skip, PP=2 resume."""
import math

from _train_helpers import tiny_config
from tests.distributed import run_ranks

PER_STEP = 256


def test_two_rank_cases(tmp_path, corpus):
    cfg = tiny_config(tmp_path / "c.yaml", tmp_path / "unused", corpus)
    results = run_ranks(2, "tests.train.rank_cases:cases", cfg, str(tmp_path), corpus["fr"], timeout=400)
    r0, r1 = results
    # --- budgets: stage "en" = 868 tokens (3 full steps + 100), "mix" = 4 x 256
    hist = r0["budget"]
    assert [h["step_tokens"] for h in hist] == [256, 256, 256, 100, 256, 256, 256, 256]
    assert [h["stage"] for h in hist] == ["en"] * 4 + ["mix"] * 4
    first_mix = hist[4]
    assert first_mix["tokens_seen"] - first_mix["step_tokens"] == 868  # transition at exactly the budget
    assert hist[3]["stage_tokens"] == 868 and hist[-1]["stage_tokens"] == 1024
    assert hist[-1]["tokens_seen"] == 868 + 1024
    for h in hist:
        assert sum(h["source_tokens"].values()) == h["stage_tokens"]
    mix_sources = hist[-1]["source_tokens"]
    assert len(mix_sources) == 2 and all(v > 0 for v in mix_sources.values())
    meta = r0["budget_meta"]
    assert meta["stage_tokens"] == {"en": 868, "mix": 1024} == meta["stage_budgets"]
    assert meta["source_tokens"]["mix"] == mix_sources
    assert r1["budget"] == hist  # both ranks agree on every counter and loss
    assert any(f.startswith("events.out.tfevents") for f in r0["tb_files"])
    # --- NaN, stop: a clear error, the planted step never checkpointed
    msg = r0["nan_stop"]
    assert msg and "step 3" in msg and "non-finite loss" in msg and "faults.nan_policy=stop" in msg, msg
    assert r0["nan_stop_tags"][-1] == "step00000002"
    # --- NaN, skip: steps 3 (loss) and 5 (gradient on one rank only) apply no update, training goes on
    skip = r0["nan_skip"]
    assert [h["skipped"] for h in skip] == [False, False, True, False, True, False, False, False]
    assert math.isnan(skip[2]["loss"]) and all(math.isfinite(h["loss"]) for i, h in enumerate(skip) if i != 2)
    assert r0["skip_unchanged"] == [0.0, 0.0] and r0["skip_changed"] > 0
    assert skip[-1]["tokens_seen"] == 868 + 1024
    # --- PP=2: resume from a checkpoint continues bit-identically
    full, resumed = r1["pp_losses"]  # every rank has the loss (broadcast from the last pipeline stage)
    assert full == resumed
    assert r0["pp_tags"][0] == r0["pp_tags"][1] == "step00000008"
    assert r0["pp_weights_diff"] == 0.0
    # --- held-out loss: the forward-only pipeline path (PP=2) and DP=2 agree (a loss counted on the wrong
    #     ranks, or summed over DP/TP twice, would not); a resumed PP run logs the same values
    full_v, resumed_v = r1["pp_valid"]
    assert [s for s, _ in full_v] == [4, 8] and full_v == resumed_v
    dp_v = r0["dp_valid"]
    assert [s for s, _ in dp_v] == [4, 8] and r1["dp_valid"] == dp_v
    for (_, a), (_, b) in zip(dp_v, full_v):
        assert math.isfinite(a) and abs(a - b) <= 1e-4 * abs(b), (dp_v, full_v)
