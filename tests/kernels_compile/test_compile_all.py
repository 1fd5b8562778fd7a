"""Every Triton kernel variant the product launches compiles to a cubin for sm_80 and sm_90 (no GPU needed).

Runs ``python -m kernels.bench.compile_all`` in a subprocess with a clean environment (no
TRITON_INTERPRET, which tests/kernels/conftest.py sets for its process; no
TRITON_ALLOW_NON_CONSTEXPR_GLOBALS), into a fresh Triton cache.  The interpreter tests in tests/kernels
check numerics; this checks that the GPU path compiles at all.
"""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNEL_MODULES = ("attention", "embedding", "doc_mask")


def _env(pythonpath):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_ALLOW_NON_CONSTEXPR_GLOBALS", "TRITON_CACHE_DIR")}
    env["PYTHONPATH"] = str(pythonpath)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _launched_kernels():
    """Names of every @triton.jit kernel (a `_kernel` function) in the kernel modules, read from source."""
    names = set()
    for mod in KERNEL_MODULES:
        names |= set(re.findall(r"^def (_\w+_kernel)\(", (ROOT / "kernels" / f"{mod}.py").read_text(), re.M))
    return names


@pytest.mark.slow
def test_every_variant_compiles_for_sm80_and_sm90(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kernels.bench.compile_all", "--out", str(tmp_path)], cwd=ROOT,
                       env=_env(ROOT), capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    [table] = tmp_path.glob("compile_all-triton-*.csv")   # beside its record (kernels/bench/record.py)
    rows = list(csv.DictReader(open(table)))
    assert rows and all(row["status"] == "ok" for row in rows)
    for row in rows:
        assert int(row["regs"]) > 0 and int(row["smem"]) >= 0 and row["variants"], row
    seen = {(row["kernel"], row["arch"]) for row in rows}
    for name in _launched_kernels():  # every kernel in the modules is launched by some variant, both archs
        assert {(name, "sm_80"), (name, "sm_90")} <= seen, name
    variants = "; ".join(row["variants"] for row in rows)
    for needed in ("attention fwd bfloat16 D64 gqa7", "attention bwd float16 D80 gqa4 det1",
                   "attention bwd float32 D128 gqa1 det0", "embedding bwd bfloat16 H896 langs0 det1",
                   "embedding bwd float32 H2048 langs2 det0", "doc_mask S2048 pad1 eodloss1"):
        assert needed in variants, needed
    assert table.with_suffix(".md").read_text().startswith("# Triton compile check")
    rec = json.loads(table.with_suffix(".json").read_text())
    assert rec["met"] is True and rec["figures"]["compiled"] == rec["figures"]["compiles"] == len(rows)


def test_non_constexpr_global_fails_the_check(tmp_path):
    """Today's bug, replayed: a plain float global read in @triton.jit code must fail the check, naming the
    variant -- even with TRITON_ALLOW_NON_CONSTEXPR_GLOBALS=1 in the caller's environment."""
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels", ignore=shutil.ignore_patterns("results", "__pycache__"))
    attn = tmp_path / "kernels" / "attention.py"
    src = attn.read_text()
    assert "_NEG = tl.constexpr(-1.0e30)" in src
    attn.write_text(src.replace("_NEG = tl.constexpr(-1.0e30)", "_NEG = -1.0e30"))
    env = _env(tmp_path)
    env["TRITON_ALLOW_NON_CONSTEXPR_GLOBALS"] = "1"
    r = subprocess.run([sys.executable, "-m", "kernels.bench.compile_all", "--archs", "90", "--only", "attention",
                        "--filter", "attention fwd bfloat16 D64 gqa2", "--jobs", "1", "--out", str(tmp_path / "out")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED _attn_fwd_kernel sm_90 [attention fwd bfloat16 D64 gqa2 cfg0" in r.stdout, r.stdout
    assert "Cannot access global variable _NEG" in r.stdout, r.stdout


def test_bad_arguments_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kernels.bench.compile_all", "--archs", "75", "--out", str(tmp_path)],
                       cwd=ROOT, env=_env(ROOT), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn_once" not in ln]
    assert r.returncode == 2 and lines == ["compile_all: --archs 75: expected one of [80, 90]"], r.stderr
    r = subprocess.run([sys.executable, "-m", "kernels.bench.compile_all", "--filter", "no such variant", "--out",
                        str(tmp_path)], cwd=ROOT, env=_env(ROOT), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "selects no variant" in r.stderr, r.stderr
    assert not list(tmp_path.glob("compile_all-*"))


def _listed(*args):
    r = subprocess.run([sys.executable, "-m", "kernels.bench.compile_all", "--list", *args], cwd=ROOT,
                       env=_env(ROOT), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return [ln for ln in r.stdout.splitlines() if ln.strip()]


def test_representative_keeps_one_compile_per_code_path():
    """--representative (the old-Triton check) drops only compiles that differ from a kept one in integer sizes and
    tiles: every kernel, dtype, flag (PREC, ATOMIC_DQ, HAS_PAD, DO_LANG, ...) and masked head dim stays, with
    the largest tiles of its path."""
    full, rep = _listed("--archs", "90"), _listed("--archs", "90", "--representative")
    assert set(rep) < set(full) and len(rep) < len(full) // 2 + 10, (len(rep), len(full))

    def path(line):
        head, ptrs, _variants = line.split(" | ")
        kernel, arch, *ce = head.split()
        ce = dict(kv.split("=", 1) for kv in ce)
        flags = tuple(sorted((k, v) for k, v in ce.items() if not v.isdigit()))
        masks = tuple(sorted((k, ce[k] != ce[f"BLOCK_{k}"]) for k in ce if f"BLOCK_{k}" in ce))
        tiles = 1
        for k, v in ce.items():
            if k.startswith("BLOCK") and v.isdigit():
                tiles *= int(v)
        return (kernel, arch, ptrs, flags, masks), tiles

    paths_full, paths_rep = {}, {}
    for line in full:
        key, tiles = path(line)
        paths_full[key] = max(paths_full.get(key, 0), tiles)
    for line in rep:
        key, tiles = path(line)
        assert key not in paths_rep, f"two compiles kept for one code path: {key}"
        paths_rep[key] = tiles
    assert paths_rep == paths_full   # every path kept, each with its largest tiles
    assert {k[3] for k in paths_rep if k[0] == "_attn_bwd_dkdv_kernel"} >= {
        (("ATOMIC_DQ", "True"), ("PREC", "tf32")), (("ATOMIC_DQ", "False"), ("PREC", "ieee"))}
