"""Typed config machinery: YAML + dotted `key=value` overrides -> nested dataclasses.

Every problem is collected and reported at once (unknown keys with a did-you-mean, wrong types,
missing required values), as one `ConfigError` whose message lists them all with the fix.
Validation never relies on `assert`, so it also holds under `python -O`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import re
import textwrap
import types
import typing
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Union

import yaml

REQUIRED = object()  # sentinel default: the key must be given


class ConfigError(ValueError):
    """One or more config problems; `.problems` holds them, the message lists every one."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


def field_docs(cls) -> dict[str, str]:
    """Field docstrings: the string literal that follows each field in the class body."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(options))})"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, path: str, problems: list[str]):
    """Check/convert `value` to the annotated type `tp`; append a problem and return None on failure."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        trials = []
        for arg in options:
            trial: list[str] = []
            out = _coerce(value, arg, path, trial)
            if not trial:
                return out
            trials += trial
        if len(options) == 1:  # an optional key: the type's own message (and that null is allowed)
            problems.append(trials[0].replace(", got ", " (or null), got ", 1))
        else:
            problems.append(f"{path}: expected {' or '.join(_type_name(a) for a in options)}, got {value!r}")
        return None
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        problems.append(f"{path}: must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return None
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):  # a single path/glob where a list is expected
            value = [value]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {value!r}")
            return None
        return [_coerce(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return None
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a section (mapping), got {value!r}")
            return None
        return _build(tp, value, path, problems)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{path}: expected true/false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1.5e6 in YAML
            return int(value)
        if isinstance(value, str):  # YAML 1.1 reads 20e9 (no dot) as a string: an integer all the same
            try:
                exact = Decimal(value.strip())
                if exact.is_finite() and exact == exact.to_integral_value():
                    return int(exact)
            except InvalidOperation:
                pass
        problems.append(f"{path}: expected an integer, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{path}: expected a number, got {value!r}")
        return None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{path}: expected a string, got {value!r}")
        return None
    return value


def _build(cls, data: dict, prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            problems.append(f"unknown key '{path}'{_did_you_mean(str(key), list(fields))}")
            continue
        kwargs[key] = _coerce(value, hints[key], path, problems)
    for name, f in fields.items():
        if name in kwargs:
            continue
        if f.default is REQUIRED:
            path = f"{prefix}.{name}" if prefix else name
            doc = field_docs(cls).get(name, "")
            problems.append(f"missing required key '{path}'" + (f": {doc}" if doc else ""))
            kwargs[name] = None
    try:
        return cls(**kwargs)
    except TypeError as e:  # only reachable through a programming error in a schema
        problems.append(f"{prefix or 'config'}: {e}")
        return None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (['train', 'lr'], 3e-4). Values are parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError([f"override '{item}' is not of the form key=value (e.g. train.lr=1e-4)"],
                          "command line")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file '{p}' does not exist (pass --config PATH to a YAML file; "
                           "examples are in configs/)"], str(p))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{p} is not valid YAML: {e}"], str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: the top level must be a mapping of keys"], str(p))
    return data


def from_dict(cls, data: dict, source: str = "config"):
    """Build dataclass `cls` from a plain dict; raise ConfigError listing every problem."""
    problems: list[str] = []
    cfg = _build(cls, data, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def load(cls, path: str | Path | None, overrides: list[str] | None = None, more=None):
    """YAML file (optional) + overrides -> validated config of type `cls`.

    `cls.validate(self) -> list[str]` (when defined) adds cross-field checks, and `more(cfg) -> list[str]` the
    checks of what the config implies (the batch plan for this world size); all problems, from parsing,
    validation and `more`, are raised together."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    source = str(path) if path else "command line"
    problems: list[str] = []
    cfg = _build(cls, data, "", problems)
    if isinstance(getattr(cfg, "output_dir", None), str):
        cfg.output_dir = os.path.expandvars(cfg.output_dir)
        unset = re.findall(r"\$\{?(\w+)", cfg.output_dir)
        if unset:
            problems.append(f"output_dir: environment variable(s) {', '.join(unset)} not set ({cfg.output_dir})")
    for check in (getattr(cfg, "validate", None), more and (lambda: more(cfg))):
        if cfg is None or check is None:
            continue
        try:  # these checks also run when some fields failed, so everything is reported at once
            problems.extend(check())
        except (TypeError, AttributeError, ValueError, ZeroDivisionError):
            if not problems:
                raise
    if problems:
        raise ConfigError(problems, source)
    return cfg
