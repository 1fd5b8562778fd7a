"""Runtime data: the data tools' indexed datasets read through megatron-core's GPTDataset / blends.

A stage's blend (prefixes and weights) goes to ``BlendedMegatronDatasetBuilder``; the global batch
of step ``t`` is samples ``[t*G, (t+1)*G)`` of the stage's dataset, split contiguously across
data-parallel ranks and then into micro-batches, so the sample order depends only on the seed and
the step — the same for every parallel layout and across a resume.

Document-aware packing: samples span documents (each ends with eod); the position ids, segment ids
(for the document-masked attention) and the loss mask are derived from the eod tokens by the fused
kernel in ``kernels.doc_mask``.
"""
from __future__ import annotations

import dataclasses
import os
import struct
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megaslm.config import ConfigError, DataSource, RunConfig, StageConfig
from megaslm.fsutil import atomic_write_text
from megaslm.vocab import (IDX_HEAD, IDX_ITEMSIZE, IDX_MAGIC, IDX_VERSION, LANG_NONE, UnitVocab, VocabError,
                           content_hash_algorithm, hash_files, manifest_path, read_manifest)


class UnitTokenizer:
    """The little a megatron-core GPTDataset needs of a tokenizer (ids are already units)."""

    def __init__(self, vocab: UnitVocab, padded_size: int):
        self.vocab = vocab
        self.vocab_size = padded_size
        self.eod = vocab.eod_id
        self.pad = vocab.pad_id
        self.bos = vocab.bos_id
        self.unique_identifiers = {"class": "UnitTokenizer", **{k: str(v) for k, v in vocab.to_dict().items()}}


@dataclasses.dataclass
class IndexedFileInfo:
    itemsize: int
    sequences: int
    documents: int        # document_indices entries minus the leading 0
    tokens: int
    lengths: "object"     # numpy int32 array (memory-mapped)


def inspect_indexed(prefix: str) -> IndexedFileInfo:
    """Cheap structural check of ``prefix.idx`` / ``prefix.bin`` (sizes and headers; no hashing). The layout is
    megatron-core's (``megaslm.vocab.IDX_*``, which data_tools writes), read here with the standard library so
    that a truncated or garbage file is one clear error before any model is built, not a numpy/megatron
    traceback after it (megatron's reader only asserts the header)."""
    import numpy as np

    idx, binp = prefix + ".idx", prefix + ".bin"
    for path in (binp, idx):
        if not os.path.exists(path):
            raise ConfigError(f"dataset {prefix}: {path} not found (build it with `python -m data_tools build`)")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(IDX_HEAD)
    if len(head) < IDX_HEAD or head[:len(IDX_MAGIC)] != IDX_MAGIC:
        raise ConfigError(f"{idx}: not a megatron indexed-dataset index (bad or truncated header, {size} bytes)")
    version, code, n, d = struct.unpack("<QBQQ", head[len(IDX_MAGIC):])
    if version != IDX_VERSION or code not in IDX_ITEMSIZE:
        raise ConfigError(f"{idx}: unsupported index (version {version}, dtype code {code}; expected version 1 "
                          f"and a dtype code in 1-8)")
    expected = IDX_HEAD + 12 * n + 8 * d
    if size not in (expected, expected + n):      # + n: the optional per-sequence mode bytes
        raise ConfigError(f"{idx}: truncated or corrupt index: {size} bytes, expected {expected} for "
                          f"{n} sequences and {d} document indices")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=IDX_HEAD, shape=(n,)) if n else np.zeros(0, np.int32)
    if n and int(lengths.min()) < 0:
        raise ConfigError(f"{idx}: corrupt index: negative sequence length")
    tokens = int(lengths.sum(dtype=np.int64))
    itemsize = IDX_ITEMSIZE[code]
    bsize = os.path.getsize(binp)
    if bsize != tokens * itemsize:
        raise ConfigError(f"{binp}: {'truncated' if bsize < tokens * itemsize else 'wrong size'}: {bsize} bytes, "
                          f"expected {tokens * itemsize} ({tokens} tokens x {itemsize} bytes, from {idx})")
    return IndexedFileInfo(itemsize, n, max(0, d - 1), tokens, lengths)


def check_dataset_files(prefix: str, manifest: Dict, verify_hash: bool = False) -> None:
    """The files at ``prefix`` are intact and agree with each other and with the manifest: token
    count and document count, the language side channel (same sequences, same lengths), and with
    ``verify_hash`` the manifest's ``content_hash`` (of the token and language ``.bin``, with the manifest's
    ``content_hash_algorithm``: XXH3-128, or SHA-256 for manifests that predate the field)."""
    import numpy as np

    mpath = manifest_path(prefix)
    info = inspect_indexed(prefix)
    tok = manifest.get("tokens", {}).get("total") if isinstance(manifest.get("tokens"), dict) else None
    if tok is not None and tok != info.tokens:
        raise ConfigError(f"{prefix}.idx: {info.tokens} tokens, but {mpath} says tokens.total={tok}")
    docs = manifest.get("documents")
    if docs is not None and docs != info.documents:
        raise ConfigError(f"{prefix}.idx: {info.documents} documents, but {mpath} says documents={docs}")
    hashed = [prefix + ".bin"]
    suffix = manifest.get("lang_channel")
    if suffix:
        lp = prefix + suffix
        lang = inspect_indexed(lp)
        if lang.itemsize != 1:
            raise ConfigError(f"{lp}.idx: language channel must be uint8, found {lang.itemsize}-byte items")
        if (lang.sequences, lang.documents) != (info.sequences, info.documents) \
                or not np.array_equal(lang.lengths, info.lengths):
            raise ConfigError(f"{lp}.idx: language side channel does not match {prefix}.idx "
                              f"({lang.sequences} sequences / {lang.documents} documents / {lang.tokens} tokens vs "
                              f"{info.sequences} / {info.documents} / {info.tokens})")
        hashed.append(lp + ".bin")
    if verify_hash and manifest.get("content_hash"):
        algorithm = content_hash_algorithm(manifest)
        try:
            got = hash_files(hashed, algorithm)
        except VocabError as e:
            raise ConfigError(f"{mpath}: {e}") from None
        if got != manifest["content_hash"]:
            raise ConfigError(f"{prefix}.bin: content does not match {mpath} content_hash "
                              f"({algorithm} {got[:16]}... vs {manifest['content_hash'][:16]}...)")


def check_manifest(prefix: str, vocab: UnitVocab, verify_hash: bool = False, need_lang: bool = False) -> Dict:
    """The dataset at ``prefix`` is intact (see ``check_dataset_files``) and maps units exactly as
    this run's vocabulary does. ``need_lang`` (``model.language_embedding``): it must also have its
    language side channel."""
    for ext in (".bin", ".idx"):
        if not os.path.exists(prefix + ext):
            raise ConfigError(f"dataset {prefix}: {prefix + ext} not found (build it with `python -m data_tools build`)")
    try:
        m = read_manifest(prefix)
    except VocabError as e:
        raise ConfigError(str(e)) from None
    mv = UnitVocab.from_dict(m["vocab"], where=manifest_path(prefix) + ":vocab")
    if mv != vocab:
        diffs = [f"{k}: dataset {getattr(mv, k)!r} vs config {getattr(vocab, k)!r}"
                 for k in mv.differences(vocab)]
        raise ConfigError(f"{manifest_path(prefix)}: vocabulary does not match the run's `vocab` ({'; '.join(diffs)})")
    if need_lang and not m.get("lang_channel"):
        raise ConfigError(f"dataset {prefix}: model.language_embedding=true needs a language side channel, but "
                          f"{manifest_path(prefix)} names none (no 'lang_channel'; rebuild it with "
                          f"`python -m data_tools build`)")
    check_dataset_files(prefix, m, verify_hash)
    return m


_CACHE_LIST = "COMPLETE"


def with_default_data(cfg: RunConfig, prefix: str) -> RunConfig:
    """A new config whose stages without data train on the dataset at ``prefix`` (weight 1): how a run with
    ``data.demo`` trains on the demo corpus (``data_tools.synthetic.prepare_demo_corpus``). The config handed
    in is left as it is."""
    stages = [st if st.data else dataclasses.replace(st, data=[DataSource(path=prefix, weight=1.0)])
              for st in cfg.schedule.stages]
    return dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, stages=stages))


def index_cache_dir(cfg: RunConfig) -> str:
    """Where megatron-core caches its sample/shuffle/blend indexes: ``data.cache_dir``, else under the
    run directory (without one, megatron writes next to the dataset and cannot cache blends)."""
    return cfg.data.cache_dir or os.path.join(cfg.output_dir, "cache", "data_index")


def _drop_uncommitted(cache: str) -> None:
    """megatron-core writes its index cache in place (description, then three .npy files); a kill
    in the middle would leave a half-written cache that the next run reads. Files not listed in
    ``COMPLETE`` (written after a finished build) are such leftovers: remove them (rank 0, before a build)."""
    if not os.path.isdir(cache):
        return
    listed = set()
    if os.path.exists(os.path.join(cache, _CACHE_LIST)):
        with open(os.path.join(cache, _CACHE_LIST)) as f:
            listed = {l.strip() for l in f if l.strip()}
    for name in os.listdir(cache):
        if name != _CACHE_LIST and name not in listed:
            os.remove(os.path.join(cache, name))


def _commit_cache(cache: str) -> None:
    if not os.path.isdir(cache):
        return
    names = sorted(n for n in os.listdir(cache) if n != _CACHE_LIST and ".tmp-" not in n)
    # no fsync: a lost listing costs a rebuild of the cache, never a wrong index
    atomic_write_text(os.path.join(cache, _CACHE_LIST), "".join(n + "\n" for n in names), fsync=False)


def _checked_gpt_dataset():
    """``CheckedGPTDataset``: megatron-core's GPTDataset that refuses a token id outside the vocabulary.

    Where a sample's tokens are read (``_query_document_sample_shuffle_indices``, which also knows the
    sample's documents) one vectorised min/max over the tokens already in hand (~6 us for a sample of 2k
    tokens, against ~300 us for megatron to assemble it, on a 2-core machine); a sample that fails it is
    one ``ConfigError`` naming the dataset, the document and the id, never an embedding index out of
    range on the device. A ``.bin`` of the right size and wrong content
    passes the start-up checks when ``data.verify_hash=false``: this is what still catches it.

    Defined on first use so that importing this module does not import megatron-core."""
    global _CheckedGPTDataset
    if _CheckedGPTDataset is not None:
        return _CheckedGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDataset

    class CheckedGPTDataset(GPTDataset):
        _lang_suffix: Optional[str] = None    # the language side channel's view (LanguageGPTDataset's)

        def _id_limit(self) -> int:
            """Ids read here must be below this: the vocabulary's size (language view: its language ids)."""
            vocab = self.config.tokenizer.vocab
            return vocab.num_lang_ids if self._lang_suffix else vocab.size

        def _query_document_sample_shuffle_indices(self, idx):
            text, docs = super()._query_document_sample_shuffle_indices(idx)
            if text.size and (int(text.max()) >= self._id_limit() or int(text.min()) < 0):
                self._refuse(docs)
            return text, docs

        def _refuse(self, docs) -> None:
            """The first of the sample's documents holding an id out of range: one line naming it."""
            import numpy as np

            vocab, limit = self.config.tokenizer.vocab, self._id_limit()
            if self._lang_suffix:
                what, path = "language id", self.dataset_path + self._lang_suffix + ".bin"
                expected = f"0 or the 1-based index of one of vocab.languages={list(vocab.languages)}"
            else:
                what, path, expected = "token id", self.dataset_path + ".bin", f"vocab.size={vocab.size}"
            for doc in docs:
                arr = np.asarray(self.dataset.get(int(doc)))
                bad = np.flatnonzero((arr >= limit) | (arr < 0))
                if bad.size:
                    at = int(bad[0])
                    raise ConfigError(
                        f"dataset {self.dataset_path}: document {int(doc)} of {path} holds {what} {int(arr[at])} at "
                        f"position {at}, expected 0..{limit - 1} ({expected}): the file is corrupt or was built for "
                        f"another vocabulary (`python -m data_tools inspect {self.dataset_path} --verify` checks its "
                        f"content hash)")
            raise ConfigError(f"dataset {self.dataset_path}: a sample of documents {[int(d) for d in docs]} of {path} "
                              f"holds a {what} outside 0..{limit - 1} ({expected})")

    _CheckedGPTDataset = CheckedGPTDataset
    return CheckedGPTDataset


_CheckedGPTDataset = None


def _language_gpt_dataset():
    """``LanguageGPTDataset``: megatron-core's GPTDataset whose samples also carry ``lang_ids``.

    Defined on first use so that importing this module does not import megatron-core."""
    global _LanguageGPTDataset
    if _LanguageGPTDataset is not None:
        return _LanguageGPTDataset
    import copy

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    class LanguageGPTDataset(_checked_gpt_dataset()):
        """A GPTDataset whose samples also carry the language side channel, token for token.

        megatron-core has no notion of a per-token side stream. The side channel
        (``<prefix><lang_channel>.bin/.idx``, uint8) has exactly the document lengths of the token
        stream (``check_dataset_files``), so megatron's own document / sample / shuffle indices address
        it too. Rather than re-implement how a sample is assembled (the sample's document pieces, the
        extra +1 token, the padding), ``_lang_view`` is a shallow copy of this dataset -- same index
        arrays, same config -- whose low-level dataset is the side channel and whose pad value is
        LANG_NONE; megatron's ``_query_document_sample_shuffle_indices`` run on it reads the same
        (document, offset, length) pieces it reads for the tokens. What is written here by hand is only
        what megatron lacks: opening the second indexed dataset and cutting its sample the way
        ``GPTDataset.__getitem__`` cuts the tokens (drop the extra last token). The view checks its ids
        against the language embedding's rows (``vocab.num_lang_ids``), as the tokens are checked against
        the vocabulary.
        """

        def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
            super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
            suffix = read_manifest(dataset_path).get("lang_channel")
            if not suffix:
                raise ConfigError(f"dataset {dataset_path}: model.language_embedding=true needs a language side "
                                  f"channel, but {manifest_path(dataset_path)} names none")
            lang = IndexedDataset(dataset_path + suffix, multimodal=False, mmap=config.mmap_bin_files)
            if not (lang.sequence_lengths.shape == indexed_dataset.sequence_lengths.shape
                    and (lang.sequence_lengths == indexed_dataset.sequence_lengths).all()):
                raise ConfigError(f"{dataset_path + suffix}.idx: language side channel does not match "
                                  f"{dataset_path}.idx (sequence lengths differ)")
            view = copy.copy(self)
            view.dataset = lang
            view._pad_token_id = LANG_NONE
            view._lang_suffix = suffix
            self._lang_view = view

        def __getitem__(self, idx):
            out = super().__getitem__(idx)
            raw, _ = self._lang_view._query_document_sample_shuffle_indices(0 if idx is None else idx)
            lang = torch.from_numpy(raw).long()
            if self.config.add_extra_token_to_sequence:
                lang = lang[:-1]      # the language of each input token (tokens = text[:-1])
            out["lang_ids"] = lang.contiguous()
            return out

    _LanguageGPTDataset = LanguageGPTDataset
    return LanguageGPTDataset


_LanguageGPTDataset = None


def build_stage_dataset(cfg: RunConfig, stage: StageConfig, num_samples: int, seed_offset: int = 0):
    """A megatron-core dataset (GPTDataset, or BlendedDataset over several) with ``num_samples`` samples.

    With ``model.language_embedding`` each sample also carries ``lang_ids`` (``LanguageGPTDataset``):
    the same samples in the same order, plus the language of every token."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    need_lang = cfg.model.language_embedding
    for src in stage.data:
        # cheap: sizes and headers (the hash was checked in run())
        check_manifest(src.path, cfg.vocab, need_lang=need_lang)
    cache = index_cache_dir(cfg)
    prefixes = [s.path for s in stage.data]
    weights = [float(s.weight) for s in stage.data]
    dcfg = GPTDatasetConfig(
        random_seed=cfg.data.seed + seed_offset,
        sequence_length=cfg.model.seq_length,
        blend=(prefixes, weights if len(prefixes) > 1 else None),
        split="100,0,0",
        tokenizer=UnitTokenizer(cfg.vocab, cfg.padded_vocab_size()),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=cache,
        mmap_bin_files=True,
    )
    import torch.distributed as dist

    first = not dist.is_initialized() or dist.get_rank() == 0   # megatron builds (and writes) on rank 0 first
    if first:
        _drop_uncommitted(cache)
    cls = _language_gpt_dataset() if need_lang else _checked_gpt_dataset()
    builder = BlendedMegatronDatasetBuilder(cls, [num_samples, 0, 0], lambda: True, dcfg)
    train, _, _ = builder.build()
    if first:
        _commit_cache(cache)
    return train


@dataclasses.dataclass
class Batch:
    tokens: torch.Tensor       # [b, s] int64
    labels: torch.Tensor       # [b, s] int64
    loss_mask: torch.Tensor    # [b, s] float32
    position_ids: torch.Tensor  # [b, s] int64
    segment_ids: torch.Tensor  # [b, s] int32
    lang_ids: Optional[torch.Tensor] = None  # [b, s] int64, only with model.language_embedding

    def to(self, device) -> "Batch":
        return Batch(*(None if getattr(self, f.name) is None else getattr(self, f.name).to(device, non_blocking=True)
                       for f in dataclasses.fields(self)))

    def split(self, n: int) -> List["Batch"]:
        parts = [torch.chunk(getattr(self, f.name), n, dim=0) if getattr(self, f.name) is not None else [None] * n
                 for f in dataclasses.fields(self)]
        return [Batch(*p) for p in zip(*parts)]

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]


def make_batch(tokens: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor],
               vocab: UnitVocab, mask_eod_loss: bool = True, document_mask: bool = True,
               lang_ids: Optional[torch.Tensor] = None) -> Batch:
    """Positions, segments and loss mask from the eod tokens (one fused pass on GPU); ``lang_ids``
    (the language side channel, with ``model.language_embedding``) is carried as it is."""
    from kernels.doc_mask import doc_positions_and_masks

    pos, seg, lm = doc_positions_and_masks(tokens, vocab.eod_id, pad_id=None, mask_eod_loss=mask_eod_loss)
    if loss_mask is not None:
        lm = lm * loss_mask.to(lm.dtype)
    if not document_mask:
        seg = torch.zeros_like(seg)
    if lang_ids is not None and lang_ids.shape != tokens.shape:
        raise ValueError(f"lang_ids: shape {tuple(lang_ids.shape)} but tokens {tuple(tokens.shape)}")
    return Batch(tokens.long(), labels.long(), lm.float(), pos.long(), seg,
                 None if lang_ids is None else lang_ids.long())


def collate(samples: Sequence[Dict[str, torch.Tensor]], cfg: RunConfig) -> Batch:
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    lm = torch.stack([s["loss_mask"] for s in samples])
    lang = torch.stack([s["lang_ids"] for s in samples]) if cfg.model.language_embedding else None
    return make_batch(tokens, labels, lm, cfg.vocab, cfg.data.mask_eod_loss, cfg.model.document_mask, lang)


def step_sample_range(step_in_stage: int, global_batch: int, dp_rank: int, dp_size: int) -> Tuple[int, int]:
    """This DP rank's contiguous slice of the stage's sample indices for one optimizer step."""
    per_rank = global_batch // dp_size
    start = step_in_stage * global_batch + dp_rank * per_rank
    return start, start + per_rank


def load_step(dataset, cfg: RunConfig, step_in_stage: int, dp_rank: int, dp_size: int,
              step_tokens: Optional[int] = None) -> Batch:
    """This rank's share of the step's global batch. ``step_tokens`` < G x S (a stage's partial last
    step): only the first ``step_tokens`` input positions of the global batch, in sample order, are
    trained on; the loss of every later position is masked (see ``row_token_counts``)."""
    a, b = step_sample_range(step_in_stage, cfg.schedule.global_batch_size, dp_rank, dp_size)
    batch = collate([dataset[i] for i in range(a, b)], cfg)
    if step_tokens is not None and step_tokens < cfg.tokens_per_step:
        S = cfg.model.seq_length
        first = a - step_in_stage * cfg.schedule.global_batch_size   # row of the global batch
        keep = torch.tensor(row_token_counts(step_tokens, cfg.schedule.global_batch_size, S)[first:first + (b - a)])
        pos = torch.arange(S).unsqueeze(0)
        batch.loss_mask = batch.loss_mask * (pos < keep.unsqueeze(1)).to(batch.loss_mask.dtype)
    return batch


# ------------------------------------------------------------------------------------------------
# Exact token budgets and per-source accounting
# ------------------------------------------------------------------------------------------------
def row_token_counts(step_tokens: int, global_batch: int, seq_length: int) -> List[int]:
    """Input positions counted for each sequence of a step's global batch (a prefix in sample order)."""
    return [max(0, min(seq_length, step_tokens - j * seq_length)) for j in range(global_batch)]


@dataclasses.dataclass(frozen=True)
class StagePlan:
    name: str
    steps: int               # optimizer steps, the partial last one included
    tokens: int              # the budget: exactly this many input positions are trained on
    last_step_tokens: int    # tokens of the last step (== tokens_per_step unless partial)

    def step_tokens(self, step_in_stage: int, tokens_per_step: int) -> int:
        return self.last_step_tokens if step_in_stage == self.steps - 1 else tokens_per_step


def stage_plans(cfg: RunConfig) -> List[StagePlan]:
    """Rule for a ``train_tokens`` budget that is not a multiple of G x S: the stage runs
    ceil(budget / (G x S)) steps; the last step keeps the full batch shape (same micro-batches on
    every rank and pipeline stage) but trains only on its first ``budget mod (G x S)`` input positions
    in sample order (whole sequences, then a cut sequence), masking the loss of the rest. Tokens
    counted = input positions trained on, so a stage ends at exactly its budget."""
    tps = cfg.tokens_per_step
    out = []
    for st, steps in zip(cfg.schedule.stages, cfg.stage_steps()):
        tokens = st.train_tokens if st.train_tokens is not None else steps * tps
        last = tokens - (steps - 1) * tps
        out.append(StagePlan(st.name, steps, tokens, last))
    return out


def step_source_tokens(dataset, cfg: RunConfig, stage: StageConfig, step_in_stage: int, step_tokens: int) -> Dict[str, int]:
    """Tokens of one global step per source prefix (every rank computes the same, no communication)."""
    import numpy as np

    G = cfg.schedule.global_batch_size
    counts = row_token_counts(step_tokens, G, cfg.model.seq_length)
    a = step_in_stage * G
    index = getattr(dataset, "dataset_index", None)
    if index is None and getattr(dataset, "path_to_dataset_index", None):
        index = np.load(dataset.path_to_dataset_index, allow_pickle=False, mmap_mode="r")  # a numeric array: no pickle
    if index is None or len(stage.data) == 1:
        return {stage.data[0].path: int(sum(counts))} if stage.data else {}
    ids = np.asarray(index[a:a + G])
    out = {s.path: 0 for s in stage.data}
    for j, c in enumerate(counts):
        if c:
            out[stage.data[int(ids[j])].path] += c
    return out
