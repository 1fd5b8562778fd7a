"""Who may import whom (ARCHITECTURE.md), checked on the source: a walk over every import statement."""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = set(sys.stdlib_module_names)


def imports_of(package):
    """(file, top-level module, full module) for every import in a package's .py files."""
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            tree = ast.parse(open(path).read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    out.append((os.path.relpath(path, ROOT), n.split(".")[0], n))
    return out


def test_kernels_import_only_torch_and_triton():
    allowed = STDLIB | {"torch", "triton", "kernels", "numpy"}
    bad = [(f, m) for f, m, _ in imports_of("kernels") if m not in allowed]
    # numpy only in the benchmark scripts
    bad += [(f, m) for f, m, _ in imports_of("kernels") if m == "numpy" and "/bench/" not in f]
    assert not bad, bad


def test_config_and_vocab_are_torch_free():
    for f, m, full in imports_of("megaslm"):
        if f in ("megaslm/config.py", "megaslm/vocab.py"):
            assert m in STDLIB | {"yaml", "megaslm"}, (f, full)
            if m == "megaslm":
                assert full in ("megaslm.vocab", "megaslm.config"), (f, full)


def test_data_tools_never_import_model_or_training():
    for f, m, full in imports_of("data_tools"):
        if m == "megaslm":
            assert full == "megaslm.vocab", (f, full)
        assert m not in ("torch_model", "deepspeed", "evals", "launchers"), (f, full)


def test_evals_never_import_training():
    for f, m, full in imports_of("evals"):
        assert not full.startswith("megaslm.train"), (f, full)
        assert m != "launchers", (f, full)


def test_nothing_imports_launchers():
    for package in ("megaslm", "kernels", "data_tools", "evals", "tests"):
        if os.path.isdir(os.path.join(ROOT, package)):
            for f, m, full in imports_of(package):
                assert m != "launchers", (f, full)


def test_megaslm_model_layer_does_not_import_training():
    for f, m, full in imports_of("megaslm"):
        if f in ("megaslm/model.py", "megaslm/layers.py", "megaslm/sharding.py", "megaslm/parallel.py",
                 "megaslm/data.py", "megaslm/cpu_compat.py"):
            assert full != "megaslm.train", (f, full)
