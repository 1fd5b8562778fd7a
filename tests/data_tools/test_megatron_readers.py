"""The output is readable unchanged by megatron-core's GPTDataset and BlendedMegatronDatasetBuilder."""
import numpy as np

from megaslm.vocab import vocab_from_manifest

from conftest import read_docs


class Tok:
    def __init__(self, vocab):
        self.vocab_size = vocab.size
        self.eod = vocab.eod_id
        self.pad = vocab.pad_id
        self.unique_identifiers = {"class": "Tok", "size": str(vocab.size)}


def _config(prefixes, weights, vocab, seq=256):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    return GPTDatasetConfig(random_seed=1, sequence_length=seq, blend=(prefixes, weights), split="100,0,0",
                            tokenizer=Tok(vocab), reset_position_ids=False, reset_attention_mask=False,
                            eod_mask_loss=False, create_attention_mask=False, path_to_cache=None,
                            mmap_bin_files=True)


def _build(cfg, n):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [n, 0, 0], lambda: True, cfg).build()
    return train


def test_gpt_dataset_samples_are_documents(demo):
    prefix = demo["prefixes"]["enfr_interleaved"]
    vocab = vocab_from_manifest(prefix)
    docs = {tuple(ids[:-1]) for ids, _ in read_docs(prefix)}
    ds = _build(_config([prefix], None, vocab), 50)
    whole = 0
    for i in range(len(ds)):
        s = ds[i]
        tok = np.concatenate([s["tokens"].numpy(), s["labels"].numpy()[-1:]])
        assert tok.max() < vocab.size and tok.min() >= 0
        assert np.array_equal(s["labels"].numpy()[:-1], s["tokens"].numpy()[1:])
        eods = np.flatnonzero(tok == vocab.eod_id)
        for a, b in zip(eods[:-1], eods[1:]):      # a segment between two eods is a whole document
            assert tuple(tok[a + 1:b]) in docs
            whole += 1
    assert whole > 0


def test_blended_builder_over_two_prefixes(demo):
    en, fr = demo["prefixes"]["en"], demo["prefixes"]["fr"]
    vocab = vocab_from_manifest(en)
    en_docs = {tuple(ids[:-1]) for ids, _ in read_docs(en)}
    fr_docs = {tuple(ids[:-1]) for ids, _ in read_docs(fr)}
    ds = _build(_config([en, fr], [0.7, 0.3], vocab), 200)
    assert type(ds).__name__ == "BlendedDataset" and len(ds) >= 200
    counts = np.bincount(np.asarray(ds.dataset_index[:200]), minlength=2)
    assert abs(counts[0] / 200 - 0.7) < 0.05
    s = ds[0]
    tok = s["tokens"].numpy()
    eods = np.flatnonzero(tok == vocab.eod_id)
    if len(eods) >= 2:
        seg = tuple(tok[eods[0] + 1:eods[1]])
        assert seg in en_docs or seg in fr_docs
