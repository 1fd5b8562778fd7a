"""A synthetic world in N languages (issue 23 item 2): ``data_tools world --languages en,fr,de,...``.

The default two-language world (no ``--languages``) stays byte-identical to the world before N languages
existed: the sha256 of every file of two small worlds were recorded with that code (commit f4faf67) and are
asserted here -- the committed sweep demo (configs/sweeps/demo.yaml) trains and scores on that world."""
import hashlib
import os

import pytest

from data_tools.cli import main

SMALL = ["--stories", "30", "--valid-stories", "5", "--bench-items", "6", "--seed", "3"]
ODD = ["--stories", "20", "--valid-stories", "4", "--bench-items", "5", "--seed", "1", "--noise", "0",
       "--topics", "3", "--characters", "2", "--function-words", "1"]
# recorded before --languages existed (f4faf67): path -> sha256
RECORDED = {
    "small": {
        "bench/align.jsonl": "72932cf2193ebcf202e2eb46a2e8e612ac2aaf702a847c87a34ba54decf6aa82",
        "bench/cloze.jsonl": "65ae588540a2138612fbe2adfc6775e6ecf3060afc29fcfc8993037499cfade6",
        "bench/manifest.json": "26178c84abd9b2814dad9b5f65031ad461cb27d691b8e26790b88d183a756efb",
        "stories.jsonl": "1425b215e2e3d0535bb3c1e28e8e0fc6b27ee0bcc4fd35931ac5505dec95a45a",
        "valid.jsonl": "1b5bdeb3a9058d6d0c21cc6e6c37bab2b88fa3d617971122620dcd5724860d97",
        "world.json": "6157ba288a0279600a29497532d3f427798898f51bd5c7a8e9a6dbede3237c59",
    },
    "odd": {
        "bench/align.jsonl": "ad5354a609c27b4533592b180198167463b2f8d8ec4382c049ad4c2b5bb5f903",
        "bench/cloze.jsonl": "5a0cc19e4fac29f7d54da23ec12b4c84db39666b9824eb9b5bf609fb5a65bfb9",
        "bench/manifest.json": "c8559b05cff8f092100f67384a7c3778a38ee7b7cc328ceda857d2e5ce08651f",
        "stories.jsonl": "c8cf99624a2ba8baa87bc3156436277a3c60820da83e0838f9be6ad2e95b276a",
        "valid.jsonl": "a2b41bd7b9fcc0c9288a3f4bba2f29ca61b7219cce35199b8d97620c7fb6fd2a",
        "world.json": "fc03b7b7530e444bd93072e02b1feebcee9673b7909f99cd58ef3c9bf4dbb4fc",
    },
}


def tree_hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root).replace(os.sep, "/")] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.mark.parametrize("name,args", [("small", SMALL), ("odd", ODD)])
def test_default_world_is_byte_identical(tmp_path, name, args, capsys):
    assert main(["world", str(tmp_path / "w")] + args) == 0
    assert tree_hashes(tmp_path / "w") == RECORDED[name]
