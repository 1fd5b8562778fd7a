"""HF initialisation is a step after build_model: megaslm/model.py never imports the interop package
(interop/hf.py uses the model's seeding, so an import back would close a circle)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _imports(path):
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_model_does_not_import_interop():
    got = _imports(os.path.join(ROOT, "megaslm", "model.py"))
    assert not [m for m in got if m.startswith("megaslm.interop")], got


def test_checkpoint_reader_does_not_import_upward():
    folder = os.path.join(ROOT, "megaslm", "checkpoint")
    for f in sorted(n for n in os.listdir(folder) if n.endswith(".py")):
        got = _imports(os.path.join(folder, f))
        bad = [m for m in got if m.split(".")[0] in ("evals", "launchers", "data_tools")
               or m.startswith(("megaslm.train", "megaslm.run", "megaslm.interop"))]
        assert not bad, (f, bad)
