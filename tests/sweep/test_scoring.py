"""eval.scoring=mean_continuation: the mean log-likelihood over the ending only."""
import pytest

from megaslm.config import ConfigError
from megaslm.config_io import load_config

from evals.report import markdown_table
from evals.scoring import utterance_score


def test_mean_continuation_is_the_ending_mean():
    lp = [-1.0, -2.0, -3.0, -6.0]      # lp[t-1] = log p(tok[t] | tok[:t]); the ending starts at token 3
    assert utterance_score(lp, 3, "mean") == pytest.approx(-3.0)
    assert utterance_score(lp, 3, "sum_continuation") == pytest.approx(-9.0)
    assert utterance_score(lp, 3, "mean_continuation") == pytest.approx(-4.5)
    # a context-free candidate without bos: its first token is not predicted
    assert utterance_score(lp, 0, "mean_continuation") == pytest.approx(-3.0)


def test_mean_continuation_prefers_the_likelier_ending_whatever_its_length():
    short = [-0.5, -1.0]                  # context token 1, ending token 2: mean -1.0
    long = [-0.5, -0.9, -0.9, -0.9, -0.9]  # ending mean -0.9 but a much lower sum
    assert utterance_score(long, 2, "mean_continuation") > utterance_score(short, 2, "mean_continuation")
    assert utterance_score(long, 2, "sum_continuation") < utterance_score(short, 2, "sum_continuation")


def test_config_accepts_it_and_the_report_names_it():
    cfg = load_config(None, ["eval.scoring=mean_continuation", "data.demo=true"])
    assert cfg.eval.scoring == "mean_continuation"
    with pytest.raises(ConfigError, match="eval.scoring"):
        load_config(None, ["eval.scoring=median", "data.demo=true"])
    md = markdown_table([{"tag": "step00000010", "tasks": {"sTC-EN": {"accuracy": 0.5, "items": 2}},
                          "alignment": {}, "scoring": "mean_continuation"}])
    assert "scoring: mean_continuation (mean log-likelihood per token of the ending only" in md
