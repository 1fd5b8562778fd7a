"""Tiny random-weight Mimi and HuBERT models (from their transformers configs) and synthetic audio."""
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def py(args, timeout=600, **kw):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


from data_tools.audio.demo import make_hubert, make_mimi, write_audio  # noqa: E402,F401  (the tests' material)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {"mimi": make_mimi(str(d / "mimi")), "hubert": make_hubert(str(d / "hubert")),
            "hubert_layer": make_hubert(str(d / "hubert_layer"), "layer")}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio")
    rows = write_audio(str(d), n=12)
    return str(d), rows
