"""data_tools imports only numpy, megatron-core's dataset package, sentencepiece, tqdm, matplotlib,
yaml (recipes) and megaslm.vocab (ARCHITECTURE.md dependency direction)."""
import ast
import os
import sys

from conftest import ROOT

ALLOWED = {"numpy", "sentencepiece", "tqdm", "matplotlib", "yaml", "data_tools", "megaslm.vocab",
           "megatron.core.datasets"}
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
                    allowed = ALLOWED | AUDIO_ALLOWED if os.path.basename(dp) == "audio" else ALLOWED
                    if not any(n == a or n.startswith(a + ".") for a in allowed):
                        bad.append(f"{fn}: {n}")
    assert not bad, bad
