"""Loading a ``megaslm.config.RunConfig`` strictly: YAML files, ``a.b.c=value`` overrides, plain trees.

Torch-free like the tree itself. A YAML mapping that repeats a key is refused naming the file and line; a
``base: other.yaml`` is merged under a file; every key must exist in the tree and every value must have its
field's type. Every error is a ``ConfigError`` naming the field (and the file).

    cfg = load_config("configs/tiny.yaml", ["parallel.tensor=2", "optimizer.lr=1e-3"])
    cfg.validate(world_size=2)
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import yaml

from megaslm.config import ConfigError, RunConfig


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Check/convert a YAML value to the annotated type; raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin in (list, List, tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin in (tuple, Tuple) else out
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string; accept numeric strings for floats
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            # inf / nan (YAML .inf, .nan, or the strings "inf", "nan") never make a valid run
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"{(where + '.') if where else ''}{k}: unknown key; expected one of {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{(where + '.') if where else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # e.g. VocabError from UnitVocab.__post_init__
        raise ConfigError(str(e)) from None


def _parse_scalar(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(tree: Dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override to a config tree (``RunConfig.to_dict()`` form), in place.

    Used by load_config and derive_config (tools that re-derive a saved run's config: evals, reshard)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected the form a.b.c=value")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            try:
                node = node[int(p)]
            except (ValueError, IndexError):
                raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a valid list index") from None
            continue
        if p not in node or node[p] is None:
            node[p] = {}
        node = node[p]
    last = parts[-1]
    value = _parse_scalar(raw)
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"override {key}: {last} is not a valid list index") from None
    else:
        node[last] = value


def _defaults_tree() -> Dict[str, Any]:
    return RunConfig().to_dict()


def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a mapping that repeats a key is an error (PyYAML keeps the last
    value silently, so a typo'd second ``lr:`` would win without a word)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # the base constructor reports unhashable keys itself
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml_strict(path: str, not_found: str, error=ConfigError) -> Any:
    """``path`` through the strict loader (a repeated key is an error naming both lines); ``error(msg)`` is
    raised with ``not_found`` when the file does not exist, with ``path:line: invalid YAML (...)`` when it
    does not parse. The run config and the sweep spec read YAML through this one function."""
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_StrictLoader)
    except FileNotFoundError:
        raise error(not_found) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise error(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None


def _read_tree(path: str, chain: Tuple[str, ...]) -> Dict[str, Any]:
    """One YAML file as a tree; a top-level ``base: other.yaml`` (relative to this file) is loaded
    first and this file's keys merged over it (mappings merge, lists and scalars replace)."""
    loaded = read_yaml_strict(path, f"{chain[-1] + ': base ' if chain else ''}{path}: config file not found")
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a path to a YAML config, got {base!r}")
    base_path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), base))
    if base_path in chain or base_path == os.path.abspath(path):
        raise ConfigError(f"{path}: base: circular include of {base_path}")
    return _merge(_read_tree(base_path, chain + (os.path.abspath(path),)), loaded)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load ``path`` (YAML; every key must exist in the tree), apply ``a.b.c=value`` overrides."""
    tree: Dict[str, Any] = {}
    src = path or "<defaults>"
    if path is not None:
        tree = _read_tree(path, ())
    # Overrides apply on top of the file's values merged over the defaults, so that e.g.
    # `schedule.stages.0.train_steps=5` works even when the file omits `schedule`.
    tree = _merge(_defaults_tree(), tree) if overrides else tree
    for item in overrides:
        apply_override(tree, item)
    try:
        return _build(RunConfig, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None


def config_from_dict(d: Dict[str, Any]) -> RunConfig:
    return _build(RunConfig, d, "")


def derive_config(saved: RunConfig, overrides: Sequence[str] = (), only: Sequence[str] = (), why: str = "",
                  edit: Optional[Callable[[Dict[str, Any], Set[str]], None]] = None) -> RunConfig:
    """A saved run's config re-derived for a tool that reads its checkpoints (evaluation, resharding): its
    tree with the ``a.b.c=value`` overrides applied, then ``edit(tree, keys)`` (the tool's own settings;
    ``keys``: the overridden ones, which it leaves as given), built as a loaded config is. With ``only`` (key
    prefixes), an override of any other key is refused, ``why`` saying what the tool may change.
    Raises ConfigError."""
    tree = saved.to_dict()
    keys: Set[str] = set()
    for item in overrides:
        key = item.partition("=")[0].strip()
        if only and not key.startswith(tuple(only)):
            raise ConfigError(f"override {key}: {why}")
        apply_override(tree, item)
        keys.add(key)
    if edit is not None:
        edit(tree, keys)
    return config_from_dict(tree)
