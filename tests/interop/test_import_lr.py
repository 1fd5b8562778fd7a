"""import-hf writes a step-0 checkpoint without an engine; a run under another schedule starts from it with
the HF weights (at another TP layout) and with ITS OWN learning rate for the first step."""
import numpy as np

from megaslm.interop.hf import config_overrides_from_hf, read_hf_config
from tests.distributed import run_ranks


def test_import_hf_then_new_schedule(llama_dir, tmp_path):
    overrides = config_overrides_from_hf(read_hf_config(llama_dir)) + [
        "model.init_new_rows=mean", "vocab.codebook_size=125", "model.make_vocab_size_divisible_by=64",
        "model.seq_length=32", "schedule.global_batch_size=4", "schedule.micro_batch_size=2",
        "schedule.stages.0.train_steps=10"]
    res = run_ranks(2, "interop_workers:import_then_resume", overrides, llama_dir, str(tmp_path))[0]
    assert res["loaded"]
    assert res["lr_first"] == 5e-3  # not the import run's 1e-3 / 5
    assert res["resumed"].keys() == res["direct"].keys()
    for k in res["direct"]:
        assert np.array_equal(res["resumed"][k], res["direct"][k]), k
