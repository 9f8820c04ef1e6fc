"""Credentials never reach logs, config.yaml, checkpoints or wandb: what looks secret is redacted."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from bertlaunch.core import configlib
from bertlaunch.core.layout import RunDir

SECRET_WORDS = ("key", "token", "secret", "password", "passwd", "auth", "credential")


def looks_secret(key: str, value) -> bool:
    k = key.lower()
    if "storage_options." in k:  # fsspec options: endpoints, keys, tokens and profiles alike, all withheld
        return True
    if any(w in k for w in SECRET_WORDS) and not k.endswith(("tokenizer", "tokens", "_tokens")):
        return True
    return isinstance(value, str) and _secret_value(value)


def _secret_value(value: str) -> bool:
    v = value.strip()
    if v.startswith(("hf_", "sk-", "ghp_", "wandb_", "xoxb-", "AKIA")) and len(v) >= 16:
        return True
    env_secrets = [val for name, val in os.environ.items()
                   if val and len(val) >= 12 and any(w in name.lower() for w in SECRET_WORDS)]
    return any(s in v for s in env_secrets)


def redact(obj, prefix: str = ""):
    """Config dict with secret-looking keys/values replaced (for config.yaml, wandb, logs)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if looks_secret(f"{prefix}{k}", v) and not isinstance(v, dict)
                    else redact(v, f"{prefix}{k}.")) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, prefix) for v in obj]
    return "<redacted>" if isinstance(obj, str) and _secret_value(obj) else obj


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with the values of secret-looking `key=value` overrides (and secret values) redacted."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        out.append(f"{key}=<redacted>" if eq and looks_secret(key, value) else redact(arg))
    return out


def secret_values(options: dict, prefix: str = "") -> list[str]:
    """The values in a mapping (fsspec storage options) that look secret: those of key/secret/token/... entries."""
    out = []
    for k, v in options.items():
        if isinstance(v, dict):
            out += secret_values(v, f"{prefix}{k}.")
        elif isinstance(v, str) and v and (any(w in f"{prefix}{k}".lower() for w in SECRET_WORDS) or _secret_value(v)):
            out.append(v)
    return out


def scrub(text: str, secrets: list[str] = ()) -> str:
    """`text` (an error message of a storage library) with the given secrets and the environment's secret values
    replaced by <redacted>."""
    env = [v for n, v in os.environ.items() if v and len(v) >= 12 and any(w in n.lower() for w in SECRET_WORDS)]
    for s in sorted(set(secrets) | set(env), key=len, reverse=True):
        text = text.replace(s, "<redacted>")
    return text


def write_config(cfg, output_dir: str) -> None:
    """output_dir/config.yaml: the resolved config, secrets redacted, written atomically."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(redact(configlib.to_dict(cfg)), sort_keys=False)
    tmp = out / "config.yaml.part"
    tmp.write_text(text)
    os.replace(tmp, RunDir(out).config)
