"""Recipe templates over a language set (megaslm/sweeps/recipes.py): a 3-language spec expands into the
data_tools builds (--langs / --pairs over the world's stories) and the stages of each template, every arm of a
budget on the same tokens; the paper's EN/FR names expand exactly as before the templates existed (the plan
recorded then: tests/sweep/data/enfr_plan_before_templates.json); a bad template is one line naming the field.
Plan level only: nothing is built or trained."""
import json
import os

import pytest

from helpers import BUDGET, ROOT, sweep, tiny_spec
from megaslm.sweeps.expand import expand
from megaslm.sweeps.spec import SweepError
from megaslm.sweeps.state import sweep_record

RECORDED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "enfr_plan_before_templates.json")
V = ["--codebook-size", "128", "--languages", "en,fr,de", "--seed", "0", "-q"]

SPEC3 = """\
name: three
output_dir: {out}
base: {root}/configs/tiny.yaml
languages: [en, fr, de]
stories: world
build_args: [--seed, "0", -q]
sizes: [{{name: xs, num_layers: 1, hidden_size: 32}}]
recipes:
  - {{name: mono, languages: [en, fr, de]}}
  - {{name: blend, languages: [en, fr, de], probs: [0.5, 0.25, 0.25]}}
  - {{name: story, languages: [en, fr, de]}}
  - {{name: interleaving, languages: [en, fr, de], probs: [0.5, 0.25, 0.25]}}
  - {{name: interleaving, pairs: [en-fr, en-de]}}
  - {{name: interleaving_ft, languages: [en, fr, de]}}
  - interleaving_only
budgets: [{budget}]
p: [0.25, 0.5]
seeds: [1, 2]
overrides: [model.seq_length=64, schedule.micro_batch_size=4, schedule.global_batch_size=4]
datasets:
  world:
    kind: files
    prefix: "{{data}}/world"
    build: [world, "{{data}}/world", --languages, "en,fr,de", --stories, "50", --seed, "3"]
custom_recipes:
  interleaving_only:
    stages: [{{name: main, data: [{{dataset: interleaved_en-fr-de}}]}}]
throughput: {{tokens_per_s: 20000, reference: xs}}
"""


def write_spec3(tmp_path, budget=256 * 80 + 7, edit=None):
    text = SPEC3.format(out=tmp_path / "sweep", root=ROOT, budget=budget)
    if edit:
        text = edit(text)
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


def test_three_languages_expand_into_builds_and_stages(tmp_path):
    sw = expand(write_spec3(tmp_path))
    world = os.path.join(sw.data_dir, "world", "stories.jsonl")
    builds = {k: d.command[3:] for k, d in sw.datasets.items() if d.command and d.command[3] == "build"}

    def build(name, *mode):
        return ["build", "-i", world, "-o", os.path.join(sw.data_dir, name), *mode, *V]
    assert builds["mono_de"] == build("mono_de", "--mode", "mono", "--lang", "de", "--pair", "de,de")
    assert builds["story_en-fr-de"] == build("story_en-fr-de", "--mode", "story-random", "--langs", "en,fr,de")
    assert builds["interleaved_en-fr-de_w0.5-0.25-0.25"] == build(
        "interleaved_en-fr-de_w0.5-0.25-0.25", "--mode", "random", "--langs", "en,fr,de", "--probs", "0.5,0.25,0.25")
    for p in ("0.25", "0.5"):     # the pairs' build uses the p axis: one instance per value
        assert builds[f"interleaved_en-fr+en-de@p{p}"] == build(
            f"interleaved_en-fr+en-de_p{p}", "--mode", "random", "--pairs", "en-fr,en-de", "--p", p)
    assert all(sw.datasets[k].needs == ["world"] for k in builds)

    arms = {}
    for r in sw.runs:
        arms.setdefault(r.recipe, []).append(r)
        assert r.tokens == 256 * 80 + 7                            # every arm of the budget, the same tokens
        assert list(r.config.vocab.languages) == ["en", "fr", "de"]
    stages = {k: [(s.name, [os.path.basename(d.path) for d in s.data], [d.weight for d in s.data])
                  for s in rs[0].config.schedule.stages] for k, rs in arms.items()}
    assert stages["mono_en-fr-de"] == [(f"mono_{l}", [f"mono_{l}"], [1.0]) for l in ("en", "fr", "de")]
    assert stages["blend_en-fr-de_w0.5-0.25-0.25"] == [
        ("blend", ["mono_en", "mono_fr", "mono_de"], [0.5, 0.25, 0.25])]
    assert stages["story_en-fr-de"] == [("story", ["story_en-fr-de"], [1.0])]
    assert stages["interleaving_en-fr-de_w0.5-0.25-0.25"] == [
        ("interleaving", ["interleaved_en-fr-de_w0.5-0.25-0.25"], [1.0])]
    ft = stages["interleaving_ft_en-fr-de"]
    assert [s[0] for s in ft] == ["en_only", "interleaving"] + [f"ft_{l}_{r}" for r in (1, 2) for l in ("en", "fr", "de")]
    assert ft[1][1] == ["interleaved_en-fr-de"] and [s[1][0] for s in ft[2:]] == ["mono_en", "mono_fr", "mono_de"] * 2
    # the paper's split: 75% pretraining, 10% interleaving, 15% of fine-tuning in equal parts (largest remainder)
    split = arms["interleaving_ft_en-fr-de"][0].stage_tokens
    assert sum(split) == 256 * 80 + 7 and abs(split[0] - 0.75 * sum(split)) < 1 and max(split[2:]) - min(split[2:]) <= 1
    # p: only the arms whose data use it run once per value
    assert sorted(r.p for r in arms["interleaving_en-fr+en-de"]) == [0.25, 0.25, 0.5, 0.5]
    assert {r.p for r in arms["story_en-fr-de"]} == {None}
    assert len(sw.runs) == 2 * (7 + 1)       # 6 templates (the pairs one at 2 p values) + 1 custom
    names = [r.name for r in sw.runs]
    assert "xs.interleaving_en-fr+en-de.b20487.p0-25.s1" in names and "xs.interleaving_only.b20487.s2" in names


def test_multilingual_example_plans(tmp_path):
    r = sweep("plan", "--spec", os.path.join(ROOT, "configs", "sweeps", "multilingual.yaml"), "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = [l for l in r.stdout.splitlines() if l.startswith("tiny.")]
    assert len(rows) == 6 and all("2.05M" in l and " 1,000 " in l for l in rows), r.stdout
    assert {l.split(".")[1] for l in rows} == {"story_en-fr-de", "interleaving_en-fr-de", "interleaving_en-fr+en-de"}


def test_staged_example_plans_the_paper_splits(tmp_path):
    """configs/sweeps/staged.yaml: the built-in en_fr / interleaving / interleaving_ft with the paper's stage splits."""
    sw = expand(os.path.join(ROOT, "configs", "sweeps", "staged.yaml"), output_dir=str(tmp_path))
    assert sorted(r.name for r in sw.runs) == sorted(f"tiny.{a}.b2048000{p}.s{s}" for s in (1, 2) for a, p in (
        ("en_fr", ""), ("interleaving", ".p0-5"), ("interleaving_ft", ".p0-5")))
    for r in sw.runs:
        stages = {st.name: st.train_tokens for st in r.config.schedule.stages}
        assert sum(stages.values()) == 2048000, (r.name, stages)
        if r.recipe == "interleaving_ft":
            assert list(stages) == ["en_only", "interleaving", "ft_en_1", "ft_fr_1", "ft_en_2", "ft_fr_2"]
            assert stages["en_only"] == 1536000 and stages["interleaving"] == 204800
        elif r.recipe == "interleaving":
            assert list(stages) == ["en_only", "interleaving"] and abs(stages["en_only"] / 2048000 - 75 / 85) < 1e-3


def _recorded_form(sw, out):
    """What the recording kept: the sweep's expansion and, per run, what a recipe decides in its config."""
    rec = sweep_record(sw)
    rec.pop("spec")
    configs = {r.name: {"name": r.config.name, "output_dir": r.config.output_dir, "seed": r.config.seed,
                        "data_seed": r.config.data.seed, "stages": r.config.to_dict()["schedule"]["stages"],
                        "vocab": r.config.to_dict()["vocab"]} for r in sw.runs}
    s = json.dumps({"record": rec, "configs": configs}, sort_keys=True)
    for a, b in ((os.path.abspath(out), "{OUT}"), (ROOT, "{ROOT}"), (sw.python, "{PY}")):
        s = s.replace(a, b)
    return json.loads(s)


def test_paper_names_expand_exactly_as_recorded(tmp_path):
    with open(RECORDED) as f:
        recorded = json.load(f)
    (tmp_path / "tiny").mkdir()
    specs = {"demo": (os.path.join(ROOT, "configs", "sweeps", "demo.yaml"), ()),
             "paper-360m": (os.path.join(ROOT, "configs", "sweeps", "paper-360m.yaml"), ()),
             # every built-in name, two p values (the spec of the recording)
             "tiny": (tiny_spec(tmp_path / "tiny", recipes=["en_only", "fr_only", "en_fr", "interleaving",
                                                             "interleaving_ft"], p=[0.25, 0.5],
                                budgets=[256 * 40 + 100]), ())}
    assert BUDGET == 256 * 10 + 100
    for key, (path, ov) in specs.items():
        out = str(tmp_path / f"out_{key}")
        assert _recorded_form(expand(path, ov, out), out) == recorded[key], key


BAD = [
    ("a language the sweep lacks", lambda t: t.replace("{name: mono, languages: [en, fr, de]}",
                                                       "{name: mono, languages: [en, it]}"),
     ":9: recipes[0].languages: unknown language 'it'"),
    ("a pair naming an unknown language", lambda t: t.replace("pairs: [en-fr, en-de]", "pairs: [en-fr, en-es]"),
     ":13: recipes[4].pairs: en-es names unknown language 'es'"),
    ("probs of the wrong length", lambda t: t.replace("probs: [0.5, 0.25, 0.25]}\n  - {name: interleaving, pairs",
                                                      "probs: [0.5, 0.5]}\n  - {name: interleaving, pairs"),
     ":12: recipes[3].probs: expected 3 numbers"),
    ("probs not summing to 1", lambda t: t.replace("probs: [0.5, 0.25, 0.25]}\n  - {name: interleaving, pairs",
                                                   "probs: [0.5, 0.25, 0.2]}\n  - {name: interleaving, pairs"),
     ":12: recipes[3].probs: expected probabilities summing to 1"),
    ("a language not in the world", lambda t: t.replace('--languages, "en,fr,de"', '--languages, "en,fr"'),
     ":9: recipes[0].languages: language 'de' is not in the world"),
    ("an unknown template", lambda t: t.replace("{name: story,", "{name: storey,"), ":11: recipes[2].name: unknown"),
    ("an unknown key", lambda t: t.replace("{name: story,", "{name: story, prob: 1,"),
     ":11: recipes[2].prob: unknown key"),
    ("no stories", lambda t: t.replace("stories: world\n", ""), "recipes[0]: a recipe template needs stories:"),
]


@pytest.mark.parametrize("what,edit,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_template_is_one_line(tmp_path, what, edit, needle):
    path = write_spec3(tmp_path, edit=edit)
    with pytest.raises(SweepError) as e:
        expand(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(path) and needle in msg, msg


def test_bad_template_exits_2_in_one_line(tmp_path):
    path = write_spec3(tmp_path, edit=lambda t: t.replace("pairs: [en-fr, en-de]", "pairs: [en-fr, fr-fr]"))
    r = sweep("plan", "--spec", path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "recipes[4].pairs: fr-fr pairs a language with itself" in r.stderr


def test_two_language_templates_have_the_paper_stages(tmp_path):
    """interleaving_ft over en, fr: the built-in recipe's stage names and fractions; interleaving with pretrain:
    its 75/85 + 10/85 split; the same stage tokens in one expansion."""
    from megaslm.sweeps.spec import BUILTIN_RECIPES

    def edit(t):
        t = t.replace("languages: [en, fr, de]\n", "languages: [en, fr]\n").replace('"en,fr,de"', '"en,fr"')
        head, _, tail = t.partition("recipes:\n")
        return head + ("recipes:\n  - {name: interleaving_ft, languages: [en, fr]}\n"
                       "  - {name: interleaving, languages: [en, fr], pretrain: en}\n"
                       "budgets:" + tail.split("budgets:", 1)[1].split("custom_recipes:")[0].replace("[0.25, 0.5]", "[0.5]")
                       + "throughput: {tokens_per_s: 20000, reference: xs}\n")
    sw = expand(write_spec3(tmp_path, budget=256 * 200 + 3, edit=edit))
    by = {r.recipe: r for r in sw.runs}
    ft, il = by["interleaving_ft_en-fr"], by["interleaving_en-fr_pre-en"]
    assert [(s.name, os.path.basename(s.data[0].path)) for s in ft.config.schedule.stages] == [
        (n, {"en": "mono_en", "fr": "mono_fr", "interleaved": "interleaved_en-fr"}[d[0][0]])
        for n, _, d in BUILTIN_RECIPES["interleaving_ft"]]
    from megaslm.sweeps import recipes
    assert [f for _, f, _ in BUILTIN_RECIPES["interleaving_ft"]] == [0.75, 0.10] + [recipes.PAPER_SPLIT[2] / 4] * 4
    from megaslm.sweeps.expand import split_budget
    assert ft.stage_tokens == split_budget(256 * 200 + 3, [f for _, f, _ in BUILTIN_RECIPES["interleaving_ft"]])
    assert il.stage_tokens == split_budget(256 * 200 + 3, [f for _, f, _ in BUILTIN_RECIPES["interleaving"]])
    assert [s.name for s in il.config.schedule.stages] == ["en_only", "interleaving"]
