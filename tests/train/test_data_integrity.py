"""Dataset integrity before the model is built: each planted corruption of an indexed dataset gives one
line naming the file and what is wrong (exit 2 from the launcher), and nothing is written or changed."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from _train_helpers import ROOT, launch_env


def _copy(prefix, dst_dir):
    """A private copy of one dataset (tokens, language channel, manifest) under ``dst_dir``."""
    os.makedirs(dst_dir, exist_ok=True)
    name = os.path.basename(prefix)
    for suffix in (".bin", ".idx", ".lang.bin", ".lang.idx", ".manifest.json"):
        shutil.copy(prefix + suffix, os.path.join(dst_dir, name + suffix))
    return os.path.join(dst_dir, name)


def _digest(prefix):
    h = hashlib.sha256()
    for suffix in (".bin", ".idx", ".lang.bin", ".lang.idx", ".manifest.json"):
        h.update(open(prefix + suffix, "rb").read())
    return h.hexdigest()


def _truncate(path, n):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - n)


def _flip_byte(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def _edit_manifest(prefix, **fields):
    path = prefix + ".manifest.json"
    m = json.load(open(path))
    for k, v in fields.items():
        if "." in k:
            a, b = k.split(".")
            m[a][b] = v
        else:
            m[k] = v
    json.dump(m, open(path, "w"))


CORRUPTIONS = {
    # name: (how to plant it, file named in the message, what the message says)
    "bin_truncated": (lambda p: _truncate(p + ".bin", 6), ".bin", "truncated"),
    "idx_truncated": (lambda p: _truncate(p + ".idx", 8), ".idx", "truncated or corrupt index"),
    "idx_garbage": (lambda p: open(p + ".idx", "wb").write(os.urandom(os.path.getsize(p + ".idx"))), ".idx",
                    "not a megatron indexed-dataset index"),
    "idx_header_only": (lambda p: _truncate(p + ".idx", os.path.getsize(p + ".idx") - 20), ".idx", "bad or truncated header"),
    "lang_truncated": (lambda p: _truncate(p + ".lang.bin", 3), ".lang.bin", "truncated"),
    "lang_misaligned": (None, ".lang.idx", "language side channel does not match"),
    "manifest_documents": (lambda p: _edit_manifest(p, documents=7), ".idx", "documents=7"),
    "manifest_tokens": (lambda p: _edit_manifest(p, **{"tokens.total": 5}), ".idx", "tokens.total=5"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_is_one_line_naming_the_file(tmp_path, corpus, name):
    from megaslm.config import ConfigError
    from megaslm.config_io import load_config
    from megaslm.data import check_manifest

    vocab = load_config(None, ["vocab.codebook_size=128"]).vocab
    p = _copy(corpus["en"], tmp_path / "d")
    check_manifest(p, vocab, verify_hash=True)  # intact copy: passes, hash included
    plant, file_suffix, what = CORRUPTIONS[name]
    if plant is None:  # the language channel of another dataset (different lengths)
        # a language channel whose sequences do not line up with the tokens' (same total length):
        # the first sequence one longer, the second one shorter
        import numpy as np

        lengths = np.memmap(p + ".lang.idx", dtype=np.int32, mode="r+", offset=34, shape=(2,))
        lengths[0] += 1
        lengths[1] -= 1
        lengths.flush()
        del lengths
    else:
        plant(p)
    before = _digest(p)
    with pytest.raises(ConfigError) as e:
        check_manifest(p, vocab)
    msg = str(e.value)
    assert "\n" not in msg and what in msg and (p + file_suffix) in msg, msg
    assert _digest(p) == before  # the check reads, never writes


def test_content_hash_checked_on_request(tmp_path, corpus):
    from megaslm.config import ConfigError
    from megaslm.config_io import load_config
    from megaslm.data import check_manifest

    vocab = load_config(None, ["vocab.codebook_size=128"]).vocab
    p = _copy(corpus["en"], tmp_path / "d")
    _flip_byte(p + ".bin", 10)   # same size, different content: only the hash can tell
    check_manifest(p, vocab)     # the cheap check (sizes, headers, counts) passes
    with pytest.raises(ConfigError, match=r"en\.bin: content does not match .*en\.manifest\.json content_hash"):
        check_manifest(p, vocab, verify_hash=True)


def test_legacy_sha256_manifest_still_verifies(tmp_path, corpus):
    """Manifests written before ``content_hash_algorithm`` was recorded hold a SHA-256: verified as such."""
    from megaslm.config import ConfigError
    from megaslm.config_io import load_config
    from megaslm.data import check_manifest

    vocab = load_config(None, ["vocab.codebook_size=128"]).vocab
    p = _copy(corpus["en"], tmp_path / "d")
    mpath = p + ".manifest.json"
    m = json.load(open(mpath))
    assert m["content_hash_algorithm"] == "xxh3_128" and len(m["content_hash"]) == 32
    h = hashlib.sha256()
    for suffix in (".bin", ".lang.bin"):
        h.update(open(p + suffix, "rb").read())
    del m["content_hash_algorithm"]
    m["content_hash"] = h.hexdigest()
    json.dump(m, open(mpath, "w"))
    check_manifest(p, vocab, verify_hash=True)
    _flip_byte(p + ".bin", 10)
    with pytest.raises(ConfigError, match=r"content does not match .* \(sha256 "):
        check_manifest(p, vocab, verify_hash=True)


def test_launcher_exits_2_before_building_anything(tmp_path, corpus):
    p = _copy(corpus["en"], tmp_path / "d")
    _truncate(p + ".bin", 6)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), "data.demo=false",
                        "vocab.codebook_size=128", f"output_dir={out}",
                        f"schedule.stages=[{{name: a, train_steps: 2, data: [{{path: {p}, weight: 1.0}}]}}]"],
                       cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and p + ".bin: truncated" in err[0], r.stderr
    assert not out.exists()  # no run directory, no model, no process group
    # the content hash is checked by default (data.verify_hash=true): a same-size random overwrite
    # mid-.bin is refused the same way, without asking for it
    p2 = _copy(corpus["fr"], tmp_path / "d2")
    _overwrite_middle(p2 + ".bin")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), "data.demo=false",
                        "vocab.codebook_size=128", f"output_dir={out}",
                        f"schedule.stages=[{{name: a, train_steps: 2, data: [{{path: {p2}, weight: 1.0}}]}}]"],
                       cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr[-2000:]
    assert err[0].startswith(f"error: {p2}.bin: content does not match {p2}.manifest.json content_hash"), err
    assert not out.exists()


def _overwrite_middle(path):
    """Random bytes over the middle third of ``path``, same size: what a bad copy or a bad disk leaves."""
    size = os.path.getsize(path)
    a = size // 3 // 2 * 2
    with open(path, "r+b") as f:
        f.seek(a)
        f.write(os.urandom(size // 3 // 2 * 2))
    assert os.path.getsize(path) == size


def _documents_with_ids_outside(prefix, suffix, limit):
    """Indices of the documents of ``prefix+suffix`` that hold an id >= ``limit`` (read directly)."""
    import numpy as np

    from megaslm.data import inspect_indexed

    info = inspect_indexed(prefix + suffix)
    ids = np.fromfile(prefix + suffix + ".bin", dtype={1: np.uint8, 2: np.uint16, 4: np.int32}[info.itemsize])
    ends = np.cumsum(info.lengths)
    return {int(np.searchsorted(ends, i, side="right")) for i in np.flatnonzero(ids >= limit)}


def test_random_overwrite_is_refused_by_default(tmp_path, corpus):
    """``data.verify_hash`` is on by default: a same-size random overwrite mid-.bin is one line naming the
    dataset's .bin and its manifest."""
    from megaslm.config import ConfigError
    from megaslm.config_io import load_config
    from megaslm.data import check_manifest

    cfg = load_config(None, ["vocab.codebook_size=128"])
    assert cfg.data.verify_hash is True
    p = _copy(corpus["en"], tmp_path / "d")
    _overwrite_middle(p + ".bin")
    with pytest.raises(ConfigError) as e:
        check_manifest(p, cfg.vocab, verify_hash=cfg.data.verify_hash)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}.bin: content does not match {p}.manifest.json content_hash"), msg


@pytest.mark.parametrize("channel", ["tokens", "lang"])
def test_out_of_vocabulary_id_named_by_the_loader(tmp_path, corpus, channel):
    """With ``data.verify_hash=false`` the overwrite passes the start-up checks (sizes, headers, counts); the
    loader's min/max over each sample's tokens refuses the first sample holding an id outside the vocabulary
    (or, with the language embedding, a language id without a row) in one line naming the dataset and the
    document -- never an embedding index out of range."""
    from megaslm.config import ConfigError, StageConfig, DataSource
    from megaslm.config_io import load_config
    from megaslm.data import build_stage_dataset, check_manifest

    lang = channel == "lang"
    cfg = load_config(None, ["vocab.codebook_size=128", "data.verify_hash=false", f"output_dir={tmp_path / 'run'}",
                             "model.seq_length=64", f"model.language_embedding={str(lang).lower()}"])
    p = _copy(corpus["en"], tmp_path / "d")
    suffix, limit = (".lang", cfg.vocab.num_lang_ids) if lang else ("", cfg.vocab.size)
    _overwrite_middle(p + suffix + ".bin")
    check_manifest(p, cfg.vocab, verify_hash=cfg.data.verify_hash, need_lang=lang)  # sizes agree: passes
    bad_docs = _documents_with_ids_outside(p, suffix, limit)
    assert bad_docs
    info_tokens = os.path.getsize(p + ".bin") // 2
    n = info_tokens // 64 + 1                # every token of the dataset in some sample
    ds = build_stage_dataset(cfg, StageConfig(name="a", train_steps=1, data=[DataSource(p, 1.0)]), n)
    with pytest.raises(ConfigError) as e:
        for i in range(len(ds)):
            ds[i]
    msg = str(e.value)
    what = "language id" if lang else "token id"
    assert "\n" not in msg and msg.startswith(f"dataset {p}: document "), msg
    assert f" of {p}{suffix}.bin holds {what} " in msg and f"expected 0..{limit - 1}" in msg, msg
    doc = int(msg.split(": document ")[1].split(" ")[0])
    assert doc in bad_docs, (doc, sorted(bad_docs))
    # an intact copy reads through without a word
    ok = _copy(corpus["en"], tmp_path / "ok")
    cfg_ok = load_config(None, ["vocab.codebook_size=128", f"output_dir={tmp_path / 'run_ok'}", "model.seq_length=64",
                                f"model.language_embedding={str(lang).lower()}"])
    ds = build_stage_dataset(cfg_ok, StageConfig(name="a", train_steps=1, data=[DataSource(ok, 1.0)]), n)
    for i in range(len(ds)):
        ds[i]


def test_launcher_out_of_vocabulary_is_one_line(tmp_path, corpus):
    """The same overwrite through the launcher with the hash check turned off: exit 2 and one line naming the
    dataset and document, from the loader (the model exists by then), not an index error on the device."""
    p = _copy(corpus["en"], tmp_path / "d")
    _overwrite_middle(p + ".bin")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launchers", "pretrain.py"), "data.demo=false",
                        "vocab.codebook_size=128", f"output_dir={tmp_path / 'run'}", "data.verify_hash=false",
                        f"schedule.stages=[{{name: a, train_steps: 2, data: [{{path: {p}, weight: 1.0}}]}}]"],
                       cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr[-2000:]
    assert err[0].startswith(f"error: dataset {p}: document ") and f"of {p}.bin holds token id " in err[0], err
    assert "expected 0..130 (vocab.size=131)" in err[0], err
