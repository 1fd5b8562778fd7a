"""Token-budget-matched sweeps (docs/sweeps.md): orchestration that sits ABOVE the rest of megaslm.

A sweep starts data builds, training and evaluation as PROCESSES (``python -m data_tools`` or the
spec's own build commands, ``launchers/pretrain.py``, ``launchers/eval.py``) and reads what they wrote
(dataset manifests, checkpoint ``meta.json``, ``metrics.jsonl``, eval ``results.json``). Nothing else in
megaslm imports this package (tests/test_import_rules.py); from below it uses only ``megaslm.config``,
``megaslm.telemetry`` (the FLOPs formula), ``megaslm.memory`` (the plan's memory column), the
checkpoint layout and ``evals.benchmarks`` (the report's task columns). Torch-free: a spec is loaded,
validated, expanded and planned in about a second.

spec     the spec schema, its strict loading and the checks that need no expansion; the repository's layout
expand   spec -> runs: sizes (presets, depth/width, the size ladder), recipes, matching by tokens or FLOPs
recipes  recipe templates over a language set (mono, blend, story, interleaving, interleaving_ft) -> datasets, stages
state    the sweep's files (resolved run configs, sweep.json) and each run's state read from its outputs
plan     the plan table: parameters, tokens per stage, steps, FLOPs, device-hours, memory and whether it fits
execute  data builds under a lock, one run's job (train, evaluate), the local / submitit / SLURM executors
report   results.csv, results.md (one row per arm) and the plots
"""
