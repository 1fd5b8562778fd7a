"""data_tools imports only numpy, megatron-core's dataset package, sentencepiece, tqdm, matplotlib,
yaml (recipes), megaslm.vocab, megaslm.fsutil (the one atomic write), megaslm.progress (the one progress
report of every long command), megaslm.deps (the environment check before
the audio tokenisers import transformers) and the torch-free benchmark record (kernels.bench.record, the one
harness every benchmark writes through) (ARCHITECTURE.md dependency direction)."""
import ast
import os
import sys

from conftest import ROOT

ALLOWED = {"numpy", "orjson", "pyarrow", "sentencepiece", "tqdm", "matplotlib", "yaml", "data_tools", "megaslm.vocab",
           "megaslm.fsutil", "megaslm.deps", "megatron.core.datasets", "kernels.bench.record",
           "megaslm.progress"}   # the one progress report of every long command (standard library; tqdm on a TTY)
# the data-build benchmark runs megatron-core's own per-item builder loop as its anchor, which takes tensors
EXTRA = {"bench_build.py": {"torch"}}
# data_tools/audio (audio -> units, docs/audio.md) runs the speech models: these, and only there
AUDIO_ALLOWED = {"torch", "transformers", "soundfile", "scipy", "sklearn"}


def test_data_tools_imports():
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for dp, _, files in os.walk(os.path.join(ROOT, "data_tools")):
        for fn in files:
            if not fn.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(dp, fn)).read())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                for n in names:
                    if n.split(".")[0] in stdlib:
                        continue
                    allowed = ALLOWED | EXTRA.get(fn, set())
                    if os.path.basename(dp) == "audio":
                        allowed = allowed | AUDIO_ALLOWED
                    if not any(n == a or n.startswith(a + ".") for a in allowed):
                        bad.append(f"{fn}: {n}")
    assert not bad, bad


def test_no_import_circles_inside_data_tools():
    """Every data_tools module's imports of other data_tools modules (function-level ones included) form
    no cycle (issue 12 item 2: bpe <-> build <-> streams used to import each other)."""
    graph = {}
    for fn in os.listdir(os.path.join(ROOT, "data_tools")):
        if not fn.endswith(".py"):
            continue
        deps = set()
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, "data_tools", fn)).read())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                    node.module.split(".")[0] == "data_tools":
                deps |= {f"data_tools.{a.name}" for a in node.names} if node.module == "data_tools" \
                    else {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "data_tools"}
        graph[f"data_tools.{fn[:-3]}"] = deps - {f"data_tools.{fn[:-3]}"}
    state = {}

    def visit(n, path):
        state[n] = "open"
        for d in graph.get(n, ()):
            assert state.get(d) != "open", " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert graph["data_tools.bpe"].isdisjoint({"data_tools.build", "data_tools.streams"})


def test_token_dtype_is_megatron_cores_rule():
    from megatron.core.datasets.indexed_dataset import DType
    from data_tools.common import token_dtype
    for n in (3, 131, 2051, 65499, 65500, 65501, 100000, 2 ** 31 - 1):
        assert token_dtype(n) is DType.optimal_dtype(n), n


def test_write_index_is_megatron_cores_index_writer():
    """data_tools.common.write_index (torch-free) writes the bytes of megatron-core's _IndexWriter."""
    import tempfile

    import numpy as np
    from megatron.core.datasets.indexed_dataset import _IndexWriter

    from data_tools.common import write_index
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for dtype in (np.uint16, np.int32, np.uint8):
            for n in (1, 2, 37, 1000):
                lengths = rng.integers(1, 3000, size=n)
                write_index(os.path.join(d, "a.idx"), dtype, lengths)
                with _IndexWriter(os.path.join(d, "b.idx"), dtype) as w:
                    w.write(lengths.tolist(), None, list(range(n + 1)))
                assert open(os.path.join(d, "a.idx"), "rb").read() == open(os.path.join(d, "b.idx"), "rb").read()


def test_idx_constants_are_megatron_cores():
    """megaslm.vocab's .idx layout constants (the one copy data_tools writes with and training reads with) are
    megatron-core's: header, every DType code and its item size."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    from megaslm.vocab import IDX_DTYPE_CODES, IDX_HEAD, IDX_ITEMSIZE, IDX_MAGIC
    assert IDX_MAGIC == _INDEX_HEADER and IDX_HEAD == len(_INDEX_HEADER) + 25
    assert IDX_DTYPE_CODES == {d.name: d.value for d in DType}
    assert IDX_ITEMSIZE == {d.value: np.dtype(d.name).itemsize for d in DType}


def _python(code: str, cwd: str = ROOT):
    """``code`` run in a fresh interpreter on this checkout (what it imports is its own)."""
    import subprocess
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_build_never_imports_torch(tmp_path):
    """A build needs neither torch nor megatron-core (importing them is ~7 s of a small build, and forking
    a process that holds torch costs ~0.1 s per worker pool): the CLI's build, workers included, runs and
    ends without them."""
    src = tmp_path / "u.jsonl"
    src.write_text("\n".join('{"units": [%d, 2]}' % i for i in range(50)) + "\n")
    code = ("import sys, multiprocessing.pool as mp\n"
            "orig = mp.Pool.__init__\n"
            "def spy(self, *a, **k):\n"
            "    assert 'torch' not in sys.modules, 'torch imported before the pool'\n"
            "    orig(self, *a, **k)\n"
            "mp.Pool.__init__ = spy\n"
            "from data_tools.cli import main\n"
            f"rc = main(['build', '-i', {str(src)!r}, '-o', {str(tmp_path / 'o')!r}, '--workers', '2',"
            " '--chunk-size', '10', '-q'])\n"
            "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, 'torch imported by the build'\n"
            "sys.exit(rc)\n")
    r = _python(code)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_missing_file_is_said_before_megatron_or_torch_is_imported(tmp_path):
    """``inspect``, ``build`` and ``bpe-encode`` of a missing file, and ``tokenize`` / ``tokenize-kmeans-train``
    without a HuBERT layer, answer without importing megatron-core, torch or transformers (that import is
    seconds of CPU: ``inspect no/such`` took 17 s on the 2-core machine, now 0.5 s)."""
    (tmp_path / "a.wav").touch()
    hubert = "'--folder', '.', '--tokenizer', 'hubert', '--model-dir', '.', '-o'"
    code = ("import sys\n"
            "from data_tools.cli import main\n"
            "for argv in (['inspect', 'no/such'], ['build', '-i', 'missing.jsonl', '-o', 'x'],\n"
            "             ['bpe-encode', '--input-prefix', 'no/such', '--output-prefix', 'o', '--model', 'm'],\n"
            f"             ['tokenize', {hubert}, 'x.jsonl'], ['tokenize-kmeans-train', {hubert}, 'x.npy']):\n"
            "    assert main(argv) == 2, argv\n"
            "heavy = [m for m in ('torch', 'megatron', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = _python(code, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("not found") == 3 and r.stderr.count("--layer is required") == 2, r.stderr
