"""Where a `silo` verb's settings come from besides its flags: a config file and the
environment, in the order people expect from `vllm serve --config` or `ray`.

    flag on the command line  >  environment (SILO_TARGET, …)  >  --config FILE  >  default

A config file (TOML or YAML) holds what the verb's flags hold,
keyed by the flag's long name without dashes (`max-concurrent` or `max_concurrent`); a
key that is no flag of the verb is an error naming the valid ones. Values are checked by
the flag's own type and choices. The environment supplies the connection settings that
every client verb shares (`ENV`), so a shell can point all of them at one server.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path

import yaml

ENV = {"target": "SILO_TARGET", "token_file": "SILO_TOKEN_FILE", "tls_ca": "SILO_TLS_CA",
       "timeout": "SILO_TIMEOUT"}


class ConfigError(ValueError):
    """A config file or environment value that does not fit the verb's flags."""


def read_config(path: str | os.PathLike) -> dict:
    """The settings of a TOML or YAML file, as a flat mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from e
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected key = value settings at the top level")
    return data


def _convert(action: argparse.Action, value, origin: str):
    """A value from a file or the environment, checked as the flag would check it."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if isinstance(value, str):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        if not isinstance(value, bool):
            raise ConfigError(f"{origin}: expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else [value]
        return [_one(action, v, origin) for v in values]
    return _one(action, value, origin)


def _one(action: argparse.Action, value, origin: str):
    if action.type is not None and isinstance(value, str):
        try:
            value = action.type(value)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
            raise ConfigError(f"{origin}: {e}") from e
    elif action.type in (int, float) and isinstance(value, int | float) and not isinstance(value, bool):
        value = action.type(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{origin}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def settings_defaults(parser: argparse.ArgumentParser, config: str | None, environ=os.environ) -> dict:
    """Defaults for `parser`'s flags from the environment and a config file (see above)."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    out: dict = {}
    if config:
        for key, value in read_config(config).items():
            dest = str(key).replace("-", "_")
            if dest not in actions or dest == "config":
                valid = ", ".join(sorted(d.replace("_", "-") for d in actions if d != "config"))
                raise ConfigError(f"{config}: {key!r} is not a setting of `{parser.prog}` (settings: {valid})")
            out[dest] = _convert(actions[dest], value, f"{config}: {key}")
    for dest, var in ENV.items():
        if dest in actions and environ.get(var):
            out[dest] = _convert(actions[dest], environ[var], var)
    return out
