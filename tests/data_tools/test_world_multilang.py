"""A synthetic world in N languages (issue 23 item 2): ``data_tools world --languages en,fr,de,...``.

The default two-language world (no ``--languages``) stays byte-identical to the world before N languages
existed: the sha256 of every file of two small worlds were recorded with that code (commit f4faf67) and are
asserted here -- the committed sweep demo (configs/sweeps/demo.yaml) trains and scores on that world."""
import hashlib
import os

import pytest

from data_tools.cli import main

SMALL = ["--stories", "30", "--valid-stories", "5", "--bench-items", "6", "--seed", "3"]
ODD = ["--stories", "20", "--valid-stories", "4", "--bench-items", "5", "--seed", "1", "--noise", "0",
       "--topics", "3", "--characters", "2", "--function-words", "1"]
# recorded before --languages existed (f4faf67): path -> sha256
RECORDED = {
    "small": {
        "bench/align.jsonl": "72932cf2193ebcf202e2eb46a2e8e612ac2aaf702a847c87a34ba54decf6aa82",
        "bench/cloze.jsonl": "65ae588540a2138612fbe2adfc6775e6ecf3060afc29fcfc8993037499cfade6",
        "bench/manifest.json": "26178c84abd9b2814dad9b5f65031ad461cb27d691b8e26790b88d183a756efb",
        "stories.jsonl": "1425b215e2e3d0535bb3c1e28e8e0fc6b27ee0bcc4fd35931ac5505dec95a45a",
        "valid.jsonl": "1b5bdeb3a9058d6d0c21cc6e6c37bab2b88fa3d617971122620dcd5724860d97",
        "world.json": "6157ba288a0279600a29497532d3f427798898f51bd5c7a8e9a6dbede3237c59",
    },
    "odd": {
        "bench/align.jsonl": "ad5354a609c27b4533592b180198167463b2f8d8ec4382c049ad4c2b5bb5f903",
        "bench/cloze.jsonl": "5a0cc19e4fac29f7d54da23ec12b4c84db39666b9824eb9b5bf609fb5a65bfb9",
        "bench/manifest.json": "c8559b05cff8f092100f67384a7c3778a38ee7b7cc328ceda857d2e5ce08651f",
        "stories.jsonl": "c8cf99624a2ba8baa87bc3156436277a3c60820da83e0838f9be6ad2e95b276a",
        "valid.jsonl": "a2b41bd7b9fcc0c9288a3f4bba2f29ca61b7219cce35199b8d97620c7fb6fd2a",
        "world.json": "fc03b7b7530e444bd93072e02b1feebcee9673b7909f99cd58ef3c9bf4dbb4fc",
    },
}


def tree_hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root).replace(os.sep, "/")] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.mark.parametrize("name,args", [("small", SMALL), ("odd", ODD)])
def test_default_world_is_byte_identical(tmp_path, name, args, capsys):
    assert main(["world", str(tmp_path / "w")] + args) == 0
    assert tree_hashes(tmp_path / "w") == RECORDED[name]


# --------------------------------------------------------------------------------------------------------
import itertools
import json

from data_tools.world import MAX_LANGUAGES, World, WorldSpec

N_ITEMS = 4
TINY = ["--stories", "12", "--valid-stories", "3", "--bench-items", str(N_ITEMS), "--seed", "5"]
LANGS = {3: ["en", "fr", "de"], 6: ["en", "fr", "de", "es", "it", "nl"]}


@pytest.fixture(scope="module", params=[3, 6])
def world(request, tmp_path_factory):
    langs = LANGS[request.param]
    out = tmp_path_factory.mktemp(f"world{request.param}") / "w"
    assert main(["world", str(out), "--languages", ",".join(langs)] + TINY) == 0
    return langs, out


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_every_ordered_pair_has_its_cloze_sets_and_every_pair_its_align_set(world):
    langs, out = world
    bench = out / "bench"
    want = {f"{k}_{a}_{b}.jsonl": ("sTC" if k == "stc" else "sSC", [a, b])
            for k in ("stc", "ssc") for a in langs for b in langs}
    want.update({f"align_{a}_{b}.jsonl": ("align", [a, b]) for a, b in itertools.combinations(langs, 2)})
    assert len(want) == 2 * len(langs) ** 2 + len(langs) * (len(langs) - 1) // 2
    assert sorted(os.listdir(bench)) == sorted(list(want) + ["manifest.json"])
    manifest = json.load(open(bench / "manifest.json"))
    assert manifest["vocab"]["languages"] == langs and manifest["world"]["languages"] == langs
    assert manifest["sets"] == {f: {"benchmark": k, "languages": l, "items": N_ITEMS} for f, (k, l) in want.items()}
    for f, (kind, pair) in want.items():
        items = read_jsonl(bench / f)
        assert len(items) == N_ITEMS and {it["benchmark"] for it in items} == {kind}
        assert all(it["languages"] == pair for it in items)
        assert len({it["id"] for it in items}) == N_ITEMS


def test_evals_loads_every_set_of_an_n_language_world(world):
    from evals.benchmarks import CROSSLINGUAL, MONOLINGUAL, load_benchmark, pair_tasks, task_key
    langs, out = world
    tasks = load_benchmark(str(out / "bench")).tasks()
    mono, cross = pair_tasks(langs)
    aligns = [task_key("align", p) for p in itertools.combinations(langs, 2)]
    assert sorted(tasks) == sorted(mono + cross + aligns) and len(set(mono + cross)) == 2 * len(langs) ** 2
    assert {len(v) for v in tasks.values()} == {N_ITEMS}
    assert pair_tasks(["en", "fr"]) == (MONOLINGUAL, CROSSLINGUAL)      # the two-language names unchanged


def test_stories_hold_every_language_sentence_aligned_and_build_with_langs(world, tmp_path, capsys):
    from evals.benchmarks import check_vocab, read_vocab_manifest
    from megaslm.vocab import UnitVocab
    langs, out = world
    stories = read_jsonl(out / "stories.jsonl")
    assert len(stories) == 12
    for st in stories:
        assert list(st) == ["id"] + langs and len({len(st[l]) for l in langs}) == 1
    prefix = str(tmp_path / "il")
    assert main(["build", "-i", str(out / "stories.jsonl"), "-o", prefix, "--mode", "random",
                 "--langs", ",".join(langs), "--codebook-size", "128", "-q"]) == 0
    m = json.load(open(prefix + ".manifest.json"))
    check_vocab(read_vocab_manifest(str(out / "bench")), UnitVocab.from_dict(m["vocab"]), str(out / "bench"))


def test_languages_differ_only_in_lexicon_and_word_order(world):
    langs, out = world
    w = json.load(open(out / "world.json"))
    lex = w["lexicon"]
    forms = {l: [tuple(x) for x in lex["words"][l] + lex["function_words"][l]] for l in langs}
    for l in langs:
        assert len(set(forms[l])) == len(forms[l])
    for a, b in itertools.combinations(langs, 2):
        assert not set(forms[a]) & set(forms[b]), (a, b)      # no word form shared by two languages
    orders = [tuple(lex["word_orders"][l]) for l in langs]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len(set(orders)) == len(langs)
    # up to 6 languages the orders differ on 3-concept sentences too
    assert len({tuple(j for j in o if j < 3) for o in orders}) == len(langs)


def test_rendering_is_the_language_word_order_of_shared_concepts():
    langs = tuple(LANGS[6])
    world = World(WorldSpec(languages=langs, noise=0.0, stories=1))
    rng = None   # noise 0: rendering draws nothing
    hero, topic = world.character_concepts[0], world.topic_concepts[1]
    for sent in ([hero] + topic[:3], [hero] + topic[2:4]):
        for l in langs:
            order = [j for j in world.orders[l] if j < len(sent)]
            fw = world.function[l]
            want = [u for i, j in enumerate(order) for u in fw[i % len(fw)] + world.words[l][sent[j]]]
            assert world.render(sent, l, rng) == want
    assert len({tuple(world.render([hero] + topic[:3], l, rng)) for l in langs}) == len(langs)


@pytest.mark.parametrize("value,expect", [
    ("en,fr,en", "'en' given twice"),
    ("en", "expected 2 to 24 languages"),
    ("en,FR", "'FR' in 'en,FR' is not a language name"),
    ("en,f_r", "is not a language name"),
    ("en,,fr", "'' in 'en,,fr' is not a language name"),
    (",".join(f"l{i}" for i in range(MAX_LANGUAGES + 1)), "expected 2 to 24 languages (one distinct word order each), got 25"),
])
def test_bad_languages_one_line_exit_2_nothing_written(tmp_path, capsys, value, expect):
    out = tmp_path / "w"
    assert main(["world", str(out), "--languages", value] + TINY) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: world: --languages: ") and expect in err, err
    assert not out.exists()


def test_help_and_docs_name_the_languages_and_the_set_files(capsys):
    with pytest.raises(SystemExit) as e:
        main(["world", "--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--languages" in help_text and "stc_<ctx>_<end>.jsonl" in help_text and "align_<a>_<b>.jsonl" in help_text
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    docs = open(os.path.join(root, "docs", "data_tools.md")).read()
    assert "--languages" in docs and "stc_<ctx>_<end>.jsonl" in docs
