"""Command line: ``python -m data_tools COMMAND ...``, the commands listed by ``--help``.

Bad input: one line ``error: FILE:LINE: field 'F': what`` on stderr and exit code 2 (no traceback).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from megaslm.progress import add_progress_option, apply_progress_option
from megaslm.vocab import VocabError

from data_tools.errors import DataError

EXIT_BAD_INPUT = 2


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with its errors in the one-line form of every other bad input: ``error: PROG: what (see PROG
    --help)`` and exit 2, not the usage block first (a typo in one flag of ``build`` printed 14 lines). Its
    subcommands' parsers are of this class too (argparse makes them of the parent's). The launchers take it
    from here (``launchers/_common.py``): the one copy."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _vocab_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vocabulary (recorded in the manifest)")
    g.add_argument("--codebook-size", type=int, default=2048,
                   help="units per source codebook: 2048 Mimi (default), 500/1000 HuBERT k-means")
    g.add_argument("--languages", default=None,
                   help="comma-separated language names (default en,fr; build: the --langs / --pairs languages)")
    g.add_argument("--lang-tags", action="store_true", help="insert a language tag before each language change")
    g.add_argument("--sentence-sep", action="store_true", help="insert a separator token between sentences")
    g.add_argument("--dedup", action="store_true", help="collapse repeated consecutive units (HuBERT practice)")


def _byte_count(text: str) -> int:
    """``--max-line-bytes``: an integer of bytes, with an optional K, M or G (binary: 1K = 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count like 268435456 or 256M, got {text!r}") from None


def _languages(a) -> tuple:
    """``--languages``, else the languages ``build --langs`` / ``--pairs`` name, else en,fr."""
    if a.languages:
        return tuple(a.languages.split(","))
    from data_tools.interleave import design_languages, parse_pairs
    langs = getattr(a, "langs", None)
    return design_languages(langs.split(",") if langs else None, parse_pairs(getattr(a, "pairs", None))) \
        or ("en", "fr")


def _vocab(a):
    from megaslm.vocab import UnitVocab, VocabError
    try:
        return UnitVocab(codebook_size=a.codebook_size, languages=_languages(a),
                         lang_tags=a.lang_tags, sentence_sep=a.sentence_sep, dedup=a.dedup)
    except VocabError as e:
        raise DataError(str(e)) from None


def make_parser() -> argparse.ArgumentParser:
    ap = OneLineArgumentParser(prog="python -m data_tools",
                               description="Unit datasets: build, adopt, inspect, BPE, budgets, synthetic worlds and "
                                           "audio to units (python -m data_tools COMMAND --help for each).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _build_parser(sub)
    _adopt_parser(sub)
    _bpe_parsers(sub)
    _budget_parser(sub)
    _inspect_and_demo_parsers(sub)
    from data_tools.world import add_parser as _world_parser
    _world_parser(sub)  # `world`: the synthetic bilingual spoken world of the demo sweep (data_tools/world.py)
    from data_tools.audio.cli import register_audio  # audio -> units: tokenize, tokenize-kmeans-train, tokenize-bench
    register_audio(sub)
    return ap




def _build_parser(sub) -> None:
    b = sub.add_parser("build", help="inputs (JSONL utterances/stories, .npy/.npz, parquet/Arrow/HF save_to_disk) -> "
                                     ".bin/.idx dataset",
                       description="Build <output>.bin/.idx, <output>.lang.bin/.idx and <output>.manifest.json.")
    b.add_argument("--input", "-i", action="append", required=True, metavar="[NAME=]PATH",
                   help="input file (repeatable): .jsonl (utterances with units, slamkit audio_repr lines, or stories), "
                        ".npy (+ .bounds.jsonl), .npz, or Hugging Face datasets: .parquet, .arrow (IPC stream or "
                        "file), a save_to_disk folder (one utterance per row); "
                        "NAME is the source name for per-source counts (default: file stem)")
    b.add_argument("--output", "-o", required=True, metavar="PREFIX", help="output prefix")
    b.add_argument("--mode", choices=["mono", "random", "story-random", "alternate"], default="mono",
                   help="how parallel stories are rendered: mono: one language; random: per-sentence language "
                        "draw; story-random: one draw per whole story; alternate: strict alternation. "
                        "Utterances are copied unchanged (own language) in every mode")
    b.add_argument("--lang", default=None, help="mono: the language (taken from stories; default for utterances)")
    b.add_argument("--pair", default=None, help="the aligned language pair of stories, e.g. en,fr "
                                                "(default: the first two --languages)")
    b.add_argument("--p", type=float, default=None, help="random / story-random: probability of the pair's second "
                   "language (per sentence / per story; with --pairs: of the drawn pair's second); default 0.5")
    b.add_argument("--langs", default=None, metavar="L1,L2,...",
                   help="random / story-random over N languages: each sentence's (story's) language drawn among "
                        "those the story holds (stories may hold a subset), with --probs renormalised over them")
    b.add_argument("--probs", default=None, metavar="P1,P2,...",
                   help="--langs: one probability per language, summing to 1 (default: equal)")
    b.add_argument("--pairs", default=None, metavar="A-B,A-C,...",
                   help="random / story-random, pivot design: each story draws one pair whose two languages it "
                        "holds, then interleaves that pair as --pair does (with --p)")
    b.add_argument("--pair-weights", default=None, metavar="W1,W2,...",
                   help="--pairs: relative weight of each pair (normalised; default: equal)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--target-length", type=int, default=2048,
                   help="split stories at sentence boundaries into documents of at most this many tokens (0: never)")
    b.add_argument("--bos", action="store_true", help="start every document with bos")
    b.add_argument("--source-type", default="mimi", help="frame-rate key: mimi (12.5 Hz), hubert25, hubert50")
    b.add_argument("--frame-rate", type=float, default=None, help="units per second (overrides --source-type)")
    b.add_argument("--bpe-model", default=None, help="encode units with this unit-BPE model (bpe-train)")
    b.add_argument("--workers", type=int, default=1)
    b.add_argument("--chunk-size", type=int, default=1024,
                   help="about this many input lines (records) per chunk, the unit of work (a line file is cut by "
                        "size; .npy/.npz chunks hold 4x, 16x in a pool of worker processes)")
    b.add_argument("--skip-bad", action="store_true",
                   help="quarantine bad records (<output>.quarantine.jsonl, counted in the manifest) instead of failing")
    b.add_argument("--max-line-bytes", type=_byte_count, default=None, metavar="N[K|M|G]",
                   help="refuse a line of a line input (JSONL, .bounds.jsonl) longer than this, naming it "
                        "(default 256M); it bounds the build's memory, see docs/data_tools.md")
    b.add_argument("--allow-gaps", action="store_true",
                   help=".npy inputs: let the .bounds.jsonl ranges skip units (by default they must cover the "
                        "array from 0 to its end, each starting where the previous one ends; overlaps are "
                        "always refused)")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress (bar or lines)")
    add_progress_option(b)
    _table_args(b)
    _vocab_args(b)


def _table_args(b) -> None:
    from data_tools.arrow_inputs import UNIT_COLUMNS
    g = b.add_argument_group("parquet / Arrow / save_to_disk inputs (data_tools/arrow_inputs.py)")
    g.add_argument("--unit-column", default=None, metavar="NAME", help="list of integer units, or a string of "
                   f"<UnN> tokens (default: the first of {', '.join(UNIT_COLUMNS)})")
    g.add_argument("--id-column", default=None, metavar="NAME", help="default: file_name or id, if present")
    g.add_argument("--lang-column", default=None, metavar="NAME", help="default: lang, if present (null: --lang)")
    g.add_argument("--duration-column", default=None, metavar="NAME",
                   help="frames per unit, for hours (default: duration, if present)")
    g.add_argument("--split", default=None, help="the split of a DatasetDict folder (default: train, or its only one)")


def _input_specs(a) -> list:
    from data_tools.arrow_inputs import TableOptions
    from data_tools.formats import InputSpec
    table = TableOptions(unit=a.unit_column, id=a.id_column, lang=a.lang_column, duration=a.duration_column,
                         split=a.split)
    return [InputSpec.parse(s, table=table) for s in a.input]


def _adopt_parser(sub) -> None:
    d = sub.add_parser("adopt", help="make a megatron-core .bin/.idx (IndexedDatasetBuilder, Megatron-LM's "
                                     "preprocess_data.py) trainable as it is: checks it, writes the manifest",
                       description="Checks PREFIX.idx/.bin (layout, sizes, every token id against the vocabulary: "
                                   "pad 0, bos 1, eod 2, [tags], [separator], units from the offset) and writes "
                                   "PREFIX.manifest.json (and, with --language, PREFIX.lang.bin/.idx); refuses in "
                                   "one line, writing nothing. Tokens are never rewritten.")
    d.add_argument("prefix", metavar="PREFIX", help="the dataset: PREFIX.bin and PREFIX.idx")
    d.add_argument("--offset", type=int, default=None, metavar="K",
                   help="the id of unit 0 in the file; must be the vocabulary's (3, plus tags and separator)")
    d.add_argument("--language", default=None, metavar="L",
                   help="the one language of every unit: writes the language side channel")
    d.add_argument("--source-type", default="mimi", help="frame-rate key for hours: mimi, hubert25, hubert50")
    d.add_argument("--frame-rate", type=float, default=None, help="units per second (overrides --source-type)")
    _vocab_args(d)


def _bpe_parsers(sub) -> None:
    t = sub.add_parser("bpe-train", help="train a sentencepiece BPE model over unit sequences",
                       description="Units map to characters chr(0x4E00+u); writes <model-prefix>.model/.vocab.")
    t.add_argument("--input", "-i", action="append", required=True, metavar="PATH")
    t.add_argument("--model-prefix", required=True)
    t.add_argument("--vocab-size", type=int, required=True, help="BPE pieces (> codebook size)")
    t.add_argument("--pair", default=None, help="languages of stories to train on (default: the first two)")
    t.add_argument("--max-sentences", type=int, default=2_000_000)
    t.add_argument("--seed", type=int, default=0)
    _vocab_args(t)

    e = sub.add_parser("bpe-encode", help="re-encode a built unit dataset with a BPE model",
                       description="Runs of one language between special tokens are encoded separately.")
    e.add_argument("--input-prefix", required=True)
    e.add_argument("--output-prefix", required=True)
    e.add_argument("--model", required=True)


def _budget_parser(sub) -> None:
    g = sub.add_parser("budget", help="steps and per-source epochs of a staged token-budget recipe",
                       description="Recipe: YAML/JSON with sources, and runs of stages {name, tokens, mixture}.")
    g.add_argument("recipe", help="e.g. data_tools/recipes/paper_1b.yaml")
    g.add_argument("--source", action="append", default=[], metavar="NAME=COUNT|PREFIX",
                   help="source size in tokens, or a dataset prefix (its manifest's token total)")
    g.add_argument("--tokens-per-step", type=int, default=None, help="default 614400 (or the recipe's)")
    g.add_argument("--repeat-warning", type=float, default=None, help="warn above this many epochs (default 4)")
    g.add_argument("--run", action="append", default=None, help="only these runs of the recipe")
    g.add_argument("--json", action="store_true", help="print JSON")


def _inspect_and_demo_parsers(sub) -> None:
    s = sub.add_parser("inspect", help="statistics of a built dataset (+ length histogram PNG)")
    s.add_argument("prefix")
    s.add_argument("--histogram", default=None, metavar="PNG", help="default <prefix>.lengths.png")
    s.add_argument("--verify", action="store_true", help="recompute the content hash")
    s.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="write a synthetic EN-FR story corpus and build en / fr / enfr_interleaved",
                       description="Learnable synthetic data (sparse Markov chains, aligned FR = mapped EN).")
    d.add_argument("out_dir")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num-stories", type=int, default=600)
    d.add_argument("--codebook-size", type=int, default=128)
    d.add_argument("--p", type=float, default=0.5)
    d.add_argument("--workers", type=int, default=1)


def _kv_list(items: List[str], flag: str):
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise DataError(f"{flag}: expected NAME=VALUE, got {it!r}")
        out[k] = v
    return out


def _design(a) -> dict:
    """``build``'s interleaving design options for BuildOptions (validated there: data_tools.interleave)."""
    from data_tools.interleave import parse_floats, parse_pairs
    if a.langs and a.p is not None:
        raise DataError("--p: not used with --langs (give each language's probability with --probs)")
    return {"story_langs": tuple(a.pair.split(",")) if a.pair else None,
            "langs": tuple(a.langs.split(",")) if a.langs else None, "probs": parse_floats(a.probs, "--probs"),
            "pairs": parse_pairs(a.pairs), "pair_weights": parse_floats(a.pair_weights, "--pair-weights")}


def run(argv: Optional[List[str]] = None) -> int:
    a = make_parser().parse_args(argv)
    apply_progress_option(getattr(a, "progress_every", None))
    if getattr(a, "audio_cmd", None):
        return a.audio_cmd(a)
    if a.cmd == "build":
        from data_tools.build import build_dataset
        from data_tools.streams import BuildOptions
        from data_tools.audio.provenance import apply_unit_source  # record the inputs' tokeniser; refuse mixes
        from data_tools.common import keep_freed_memory
        keep_freed_memory()     # this process is ours: no page faults on every chunk's temporaries
        vocab = apply_unit_source(a, _vocab(a))
        opts = BuildOptions(vocab=vocab, mode=a.mode, p=0.5 if a.p is None else a.p, seed=a.seed,
                            target_length=a.target_length, lang=a.lang, **_design(a),
                            add_bos=a.bos, source_type=a.source_type, frame_rate=a.frame_rate,
                            bpe_model=a.bpe_model, skip_bad=a.skip_bad, allow_gaps=a.allow_gaps, workers=a.workers,
                            chunk_size=a.chunk_size, progress=not a.quiet,
                            **({"max_line_bytes": a.max_line_bytes} if a.max_line_bytes is not None else {}))
        m = build_dataset(_input_specs(a), a.output, opts)
        t = m["tokens"]
        print(f"wrote {a.output}.bin/.idx (+ .lang, manifest): {m['documents']:,} documents, {t['total']:,} tokens "
              f"({', '.join(f'{k} {v:,}' for k, v in t['per_language'].items())})"
              + (f"; {m['quarantine']['count']} bad records -> {m['quarantine']['report']}"
                 if m["quarantine"]["count"] else ""))
    elif a.cmd == "adopt":
        from data_tools.adopt import adopt
        m = adopt(a.prefix, _vocab(a), a.offset, a.language, a.source_type, a.frame_rate)
        print(f"adopted {a.prefix}: {m['documents']:,} documents, {m['tokens']['total']:,} tokens "
              f"({m['adopted']['special_tokens']['eod']:,} eod); wrote {a.prefix}.manifest.json"
              + (f" and {a.prefix}.lang.bin/.idx" if a.language else ""))
    elif a.cmd == "bpe-train":
        from data_tools.bpe import iter_training_sequences, train_bpe
        vocab = _vocab(a)
        pair = tuple(a.pair.split(",")) if a.pair else tuple(vocab.languages[:2])
        seqs = iter_training_sequences(a.input, vocab.codebook_size, vocab.languages, pair, dedup=vocab.dedup)
        path = train_bpe(seqs, a.model_prefix, a.vocab_size, vocab.codebook_size, a.max_sentences, a.seed)
        print(f"wrote {path}")
    elif a.cmd == "bpe-encode":
        from data_tools.bpe import encode_dataset
        m = encode_dataset(a.input_prefix, a.output_prefix, a.model)
        print(f"wrote {a.output_prefix}: {m['tokens']['total']:,} tokens ({m['bpe']['pieces']} pieces)")
    elif a.cmd == "budget":
        from data_tools.budget import format_plan, load_recipe, plan
        p = plan(load_recipe(a.recipe), _kv_list(a.source, "--source"), a.tokens_per_step, a.repeat_warning, a.run)
        print(json.dumps(p, indent=2) if a.json else format_plan(p))
    elif a.cmd == "inspect":
        from data_tools.stats import dataset_stats, format_stats
        s = dataset_stats(a.prefix, a.histogram or a.prefix + ".lengths.png", verify_hash=a.verify)
        print(json.dumps(s, indent=2) if a.json else format_stats(s))
    elif a.cmd == "demo":
        from data_tools.synthetic import write_demo_corpus
        p = write_demo_corpus(a.out_dir, seed=a.seed, num_stories=a.num_stories,
                              codebook_size=a.codebook_size, p=a.p, workers=a.workers)
        print(json.dumps(p, indent=2))
    elif a.cmd == "world":
        from data_tools.world import run_cli
        print(json.dumps(run_cli(a), indent=2))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from megaslm.deps import kernels_name_clash
    clash = kernels_name_clash()   # before the audio tokenisers import transformers (megaslm/deps.py)
    if clash:
        print(f"error: {clash}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return run(argv)
    except (DataError, VocabError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        # a write no command wrapped itself (every data_tools write path does: common.writing): still one
        # line naming the file and its file system, never a traceback
        from data_tools.common import WRITE_ERRNOS, write_error
        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {write_error(e, e.filename or '.', 'a file', 'the command stopped')}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted (no partial dataset left)", file=sys.stderr)
        return 130
