"""Reading the JSON configs that diffusers and transformers write, into minipa's dataclasses.

Every model has a small config dataclass (`UNetConfig`, `VAEConfig`, …) with `sd15()`-style
constructors. `config_from_dict` fills one from a `config.json` and refuses what minipa cannot
honour: a field set to a value we do not implement is an error that names the field, the value
found and the values supported, never a silent fallback.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config file that is missing, unreadable or asks for something minipa does not support."""


def read_json(path: str | Path, what: str, error: type[Exception] = ConfigError) -> dict:
    """Read a JSON object from `path`; `what` names the file's role in error messages, raised as `error`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: expected a JSON file at {path}, but there is no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{what}: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise error(f"{what}: {path} should hold a JSON object, found {type(data).__name__}")
    return data


def config_from_dict(
    cls: type,
    data: Mapping[str, Any],
    *,
    family: str,
    source: str | Path = "<dict>",
    fixed: Mapping[str, tuple] = {},
    renames: Mapping[str, str] = {},
    ignored: tuple[str, ...] = (),
):
    """Build dataclass `cls` from a diffusers/transformers config mapping.

    - keys starting with "_" (`_class_name`, `_diffusers_version`, …) are bookkeeping and skipped;
    - `renames` maps a file key to a dataclass field when the names differ;
    - `fixed` lists settings minipa does not implement: each is accepted only with one of the
      listed values (the ones that switch the feature off), anything else is an error;
    - `ignored` lists settings that only tune a feature that is switched off (accepted, no effect);
    - any other key that is not a dataclass field is an error, so nothing is silently ignored.
    Fields missing from the file keep the dataclass defaults.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    values, problems = {}, []
    for key, value in data.items():
        if key.startswith("_") or key in ignored:
            continue
        name = renames.get(key, key)
        if name in fields:
            values[name] = tuple(value) if isinstance(value, list) else value
        elif key in fixed:
            if value not in fixed[key]:
                allowed = " or ".join(repr(v) for v in fixed[key])
                problems.append(f"{key}={value!r} is not supported (minipa supports {allowed})")
        else:
            problems.append(f"{key}={value!r} is not a setting of {family}")
    hints = typing.get_type_hints(cls)
    problems += [
        f"{name}={value!r} should be {_describe(hints[name])}" for name, value in values.items() if not _matches(value, hints[name])
    ]
    if problems:
        raise ConfigError(f"{source}: this config is not one minipa can build as {family}:\n  - " + "\n  - ".join(problems))
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: invalid {family} config: {err}") from None


def _matches(value, hint) -> bool:
    """Does a JSON value fit a dataclass field's type (int, float, bool, str, tuples, optionals)?"""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in args)
    if origin is tuple:
        item = args[0] if args else Any
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # anything richer is left to the dataclass's own checks


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in args)
    if origin is tuple:
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}.get(hint, str(hint))
