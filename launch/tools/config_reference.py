"""The key reference, docs/config.md, generated from the config dataclasses (their types, defaults and field
docstrings): `python -m bertlaunch.tools.config_reference [--out docs/config.md]`. tests/test_docs.py fails when the
committed file is stale."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from bertlaunch.core.configlib import REQUIRED, field_docs
from bertlaunch.tasks.classify.config import FinetuneConfig
from bertlaunch.tasks.embed.config import EmbedConfig
from bertlaunch.tasks.glue.config import GlueConfig
from bertlaunch.tasks.mlm.config import PretrainConfig

ENTRIES = [("pretrain", "launch/pretrain.py", PretrainConfig), ("finetune", "launch/finetune.py", FinetuneConfig),
           ("glue", "launch/glue.py", GlueConfig), ("embed", "launch/embed.py", EmbedConfig)]
OUT = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is typing.Literal:
        return " / ".join(repr(a) for a in args).replace("'", "`")
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping {type_name(args[0])} -> {type_name(args[1])}" if args else "mapping"
    if dataclasses.is_dataclass(tp):
        return "list entries below"
    return getattr(tp, "__name__", str(tp))


def default_of(f: dataclasses.Field, owner) -> str:
    if f.default is REQUIRED:
        return "**required**"
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    return f"`{'null' if value is None else str(value).lower() if isinstance(value, bool) else value}`"


def rows(cls, prefix: str, instance=None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) of every leaf key below `cls`, sections expanded in place; the defaults of a
    section come from its parent's default instance (GLUE's train section has other defaults than fine-tuning's)."""
    hints, docs = typing.get_type_hints(cls), {}
    for klass in reversed(cls.__mro__):  # a subclass's docstrings override its base's
        if dataclasses.is_dataclass(klass):
            docs.update(field_docs(klass))
    instance = instance if instance is not None else _default_instance(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        value = getattr(instance, f.name, None) if instance is not None else None
        if dataclasses.is_dataclass(tp):
            out += rows(tp, key + ".", value)
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        default = default_of(f, cls) if instance is None or f.default is REQUIRED else _shown(value)
        out.append((key, type_name(tp), default, docs.get(f.name, "")))
        if item is not None and dataclasses.is_dataclass(item):
            out += rows(item, key + "[].", None)
    return out


def _default_instance(cls):
    try:
        return cls()
    except TypeError:  # a required field without a default
        return None


def _shown(value) -> str:
    if value is REQUIRED:
        return "**required**"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return "`null`" if value is None else f"`{value}`"


def render() -> str:
    parts = ["# Config key reference", "",
             "Generated from the config dataclasses by `python -m bertlaunch.tools.config_reference` (do not edit "
             "by hand; tests/test_docs.py fails when this file is stale). One YAML file plus dotted `key=value` "
             "overrides; unknown keys are rejected with a did-you-mean, and every problem is reported at once.", ""]
    for name, script, cls in ENTRIES:
        parts += [f"## `bertlaunch {name}` / `{script}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, tp, default, doc in rows(cls, ""):
            parts.append(f"| `{key}` | {tp} | {default} | {doc.replace('|', '/')} |")
        parts.append("")
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bertlaunch.tools.config_reference", description=__doc__)
    p.add_argument("--out", default=str(OUT), help="where to write it (default: docs/config.md)")
    args = p.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(render())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
