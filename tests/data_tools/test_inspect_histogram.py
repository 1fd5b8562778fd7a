"""`inspect --histogram`: document lengths split by language (each language, mixed, none), on shared bins."""
import numpy as np
import pytest

from data_tools.stats import _document_languages, dataset_stats, histogram_figure


def test_document_languages():
    # doc 0 all en (1), doc 1 all fr (2), doc 2 both, doc 3 no language id on any token
    L = np.array([1, 1, 2, 2, 1, 2, 0, 0], dtype=np.uint8)
    docid = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    assert _document_languages(L, docid, 4, 2).tolist() == [0, 1, 2, 3]


def test_histogram_split_by_language():
    import matplotlib.pyplot as plt

    lengths = np.array([10, 12, 30, 31, 32, 50])
    fig = histogram_figure(lengths, np.array([0, 0, 1, 1, 1, 2]), ["en", "fr", "mixed", "none"], "d")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["en (2 documents)", "fr (3 documents)", "mixed (1 documents)"]   # none: no document
    assert "by language" in ax.get_title()
    plt.close(fig)


@pytest.mark.parametrize("which,expect", [("en", {"en"}), ("enfr_interleaved", {"en", "fr", "mixed"})])
def test_inspect_counts_documents_by_language(demo, tmp_path, which, expect):
    s = dataset_stats(demo["prefixes"][which], str(tmp_path / "h.png"))
    by = s["documents_by_language"]
    assert set(by) <= expect and sum(by.values()) == s["documents"] and s["histogram"] == str(tmp_path / "h.png")
    if which == "enfr_interleaved":
        assert by["mixed"] > s["documents"] // 2
