"""Evaluation of speech-unit LMs through the same sharded model as training (docs/evals.md).

benchmarks  on-disk format (manifest.json + JSONL items), loaders that validate it
preflight   benchmarks checked against a checkpoint's recorded vocabulary before any model (torch-free)
checkpoint  engine-free DeepSpeed checkpoint reader -> canonical full state dict (any layout)
engine      eval layout, model build/load, TP/PP/DP forward, vocab-parallel token log-probs
scoring     sSC / sTC (mono + cross-lingual), sBLIMP, sWUGGY pairwise accuracy
alignment   per-layer cosine / top-1 retrieval of mean-pooled hidden states of parallel utterances
generate    sampling (temperature, top-k, top-p, seed) through the sharded model
runner      evaluate(chunks, ...), evaluate_checkpoint, evaluate_path (launchers/eval.py)
hooks       evaluate_chunks(chunks, cfg, step) for periodic evaluation during training
report      results.json, results.md (the paper's table layout), evals.png
xling       the N x N cross-lingual matrices (context x ending language, alignment per pair), torch-free
synthetic   a tiny benchmark folder from a stories JSONL (tests, README example)
"""
