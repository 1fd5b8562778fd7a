"""`budget`: steps and per-source epochs of a staged recipe at a tokens-per-step.

Recipe (YAML or JSON)::

    tokens_per_step: 614400          # optional (the CLI flag wins)
    sources: {en: {tokens: 3.42e9}, fr: {manifest: data/fr}}   # sizes: counts or dataset prefixes
    runs:                            # or a single top-level `stages:` list
      en_only:
        stages:
          - {name: pretrain, tokens: 46.08e9, mixture: {en: 1.0}}
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from data_tools.errors import DataError

DEFAULT_TOKENS_PER_STEP = 614_400
DEFAULT_REPEAT_WARNING = 4.0


def load_recipe(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise DataError("recipe not found", path=path)
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml/json parse errors
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise DataError(f"cannot parse recipe ({e.__class__.__name__}: {str(e).splitlines()[0]})", path=path,
                        line=None if line is None else line + 1) from None
    if not isinstance(data, dict):
        raise DataError("expected a mapping at top level", path=path)
    return data


def source_size(spec: Any, where: str) -> float:
    """A count, ``{tokens: N}`` or ``{manifest: prefix}`` (the dataset's manifest token total)."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return float(spec)
    if isinstance(spec, str):
        try:
            return float(spec)
        except ValueError:
            spec = {"manifest": spec}
    if isinstance(spec, dict):
        if "tokens" in spec:
            return float(spec["tokens"])
        if "manifest" in spec:
            from megaslm.vocab import read_manifest
            try:
                return float(read_manifest(spec["manifest"])["tokens"]["total"])
            except (ValueError, KeyError) as e:
                raise DataError(f"cannot read the source size: {e}", field=where) from None
    raise DataError(f"expected a token count, {{tokens: N}} or {{manifest: PREFIX}}, got {spec!r}", field=where)


def plan(recipe: Dict[str, Any], sizes: Optional[Dict[str, Any]] = None,
         tokens_per_step: Optional[int] = None, repeat_warning: Optional[float] = None,
         runs: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """One entry per run: its stages with steps, per-source tokens/epochs, and warnings."""
    tps = int(tokens_per_step or recipe.get("tokens_per_step") or DEFAULT_TOKENS_PER_STEP)
    warn_at = float(repeat_warning or recipe.get("repeat_warning") or DEFAULT_REPEAT_WARNING)
    src = {k: source_size(v, f"sources.{k}") for k, v in (recipe.get("sources") or {}).items()}
    src.update({k: source_size(v, f"--source {k}") for k, v in (sizes or {}).items()})
    all_runs = recipe.get("runs") or {"recipe": {"stages": recipe.get("stages")}}
    if runs:
        missing = [r for r in runs if r not in all_runs]
        if missing:
            raise DataError(f"unknown run(s) {missing}; the recipe has {sorted(all_runs)}", field="runs")
        all_runs = {r: all_runs[r] for r in runs}
    out = []
    for rname, run in all_runs.items():
        stages = (run or {}).get("stages")
        if not isinstance(stages, list) or not stages:
            raise DataError("expected a non-empty list of stages", field=f"runs.{rname}.stages")
        used: Dict[str, float] = {}
        rows, warnings = [], []
        for i, st in enumerate(stages):
            where = f"runs.{rname}.stages[{i}]"
            if not isinstance(st, dict) or "tokens" not in st or "mixture" not in st:
                raise DataError("a stage needs name, tokens and mixture", field=where)
            tokens = int(round(float(st["tokens"])))
            mix = st["mixture"]
            if not isinstance(mix, dict) or not mix or any(float(w) < 0 for w in mix.values()):
                raise DataError("mixture: expected {source: weight >= 0}", field=where + ".mixture")
            wsum = sum(float(w) for w in mix.values())
            per = {}
            for s, w in mix.items():
                t = tokens * float(w) / wsum
                used[s] = used.get(s, 0.0) + t
                size = src.get(s)
                per[s] = {"tokens": t, "epochs": (t / size) if size else None,
                          "cumulative_epochs": (used[s] / size) if size else None}
                if size and used[s] / size > warn_at:
                    warnings.append(f"{st.get('name', i)}: source '{s}' repeated {used[s] / size:.2f} epochs "
                                    f"(> {warn_at:g}) by the end of this stage")
                if not size:
                    warnings.append(f"{st.get('name', i)}: size of source '{s}' unknown (give --source {s}=N)")
            rows.append({"name": st.get("name", f"stage{i}"), "tokens": tokens, "steps": tokens / tps,
                         "whole_steps": tokens % tps == 0, "sources": per, "note": st.get("note")})
        out.append({"run": rname, "tokens_per_step": tps, "stages": rows, "warnings": warnings,
                    "total_tokens": sum(r["tokens"] for r in rows),
                    "note": (run or {}).get("note")})
    return out


def format_plan(plans: List[Dict[str, Any]]) -> str:
    lines = []
    for p in plans:
        lines.append(f"== {p['run']}  (total {p['total_tokens'] / 1e9:.3f}B tokens, "
                     f"{p['total_tokens'] / p['tokens_per_step']:,.1f} steps at {p['tokens_per_step']:,} tokens/step)")
        if p.get("note"):
            lines.append(f"   {p['note']}")
        lines.append(f"   {'stage':<16}{'tokens':>10}{'steps':>12}  {'source':<18}{'tokens':>10}{'epochs':>9}{'cum.':>8}")
        for r in p["stages"]:
            steps = f"{r['steps']:,.0f}" if r["whole_steps"] else f"{r['steps']:,.2f}*"
            first = True
            for s, v in r["sources"].items():
                ep = "?" if v["epochs"] is None else f"{v['epochs']:.2f}"
                cu = "?" if v["cumulative_epochs"] is None else f"{v['cumulative_epochs']:.2f}"
                head = f"   {r['name']:<16}{r['tokens'] / 1e9:>9.3f}B{steps:>12}" if first else " " * 41
                lines.append(f"{head}  {s:<18}{v['tokens'] / 1e9:>9.3f}B{ep:>9}{cu:>8}")
                first = False
        if any(not r["whole_steps"] for r in p["stages"]):
            lines.append("   * not a whole number of steps")
        for w in p["warnings"]:
            lines.append(f"   WARNING {w}")
        lines.append("")
    return "\n".join(lines)
