import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from data_tools.synthetic import write_demo_corpus

    d = tmp_path_factory.mktemp("corpus")
    return write_demo_corpus(str(d), seed=3, num_stories=40, codebook_size=128)
