import json
import os
import sys
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def read_docs(prefix):
    """All documents (tokens, langs) through megatron-core's own IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megaslm.vocab import lang_prefix
    ds, ls = IndexedDataset(prefix), IndexedDataset(lang_prefix(prefix))
    assert len(ds) == len(ls)
    # copy: megatron's IndexedDataset.__del__ closes the mmap under any array still viewing it
    return [(np.array(ds[i], dtype=np.int64), np.array(ls[i], dtype=np.uint8)) for i in range(len(ds))]


def leftovers(directory, prefix_name):
    return sorted(n for n in os.listdir(directory) if n.startswith(prefix_name))


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    from data_tools.synthetic import write_demo_corpus
    d = tmp_path_factory.mktemp("demo")
    return {"dir": str(d), "prefixes": write_demo_corpus(str(d), seed=0, num_stories=300, codebook_size=64)}
