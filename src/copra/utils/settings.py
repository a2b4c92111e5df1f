"""Settings for any config dataclass: defaults <- YAML file <- `--set key=value`, checked on the way.

One reader for every config class (TrainConfig, each experiment's, the suite's): `read_values`
merges a YAML file and `--set` overrides, `check_known` refuses a key the class lacks (one error line
that names it), `build_dataclass` coerces each value to its field's type. `copra.core.config` holds the
training run's schema; this module knows nothing of it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

import yaml

from copra.utils.errors import UserError


def read_values(path: str | Path | None = None, sets: list[str] | None = None) -> dict[str, Any]:
    """The keys of a YAML file (if any) with `--set` overrides on top, not yet checked."""
    values = read_yaml(path) if path else {}
    values.update(parse_sets(sets or []))
    return values


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader (no arbitrary objects)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read config file {path}: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"config file {path} is not valid YAML: {first}") from None
    except RecursionError:
        raise UserError(f"config file {path} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`["lr=5e-4", "method=lora"]` -> {"lr": 0.0005, "method": "lora"} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set takes key=value, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError):
            out[key.strip()] = raw
    return out


def check_names(values: dict[Any, Any]) -> None:
    """UserError unless every key is a string (YAML allows `1: x` or `[a]: x`)."""
    for key in values:
        if not isinstance(key, str):
            raise UserError(f"config keys must be names, got {short(key)}")


def check_known(values: dict[str, Any], cls: type) -> None:
    """UserError naming the first key of `values` that is no field of the dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown config key {short(unknown[0])}; known keys: {', '.join(sorted(names))}")


def build_dataclass(cls: type, values: dict[str, Any]):
    """An instance of a config dataclass from a mapping: unknown keys and wrong types are UserErrors."""
    check_names(values)
    check_known(values, cls)
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(k, v, hints[k]) for k, v in values.items()})


def load_dataclass(cls: type, path: str | Path | None = None, sets: list[str] | None = None):
    """Defaults of `cls` <- YAML file <- --set overrides (for experiment configs)."""
    return build_dataclass(cls, read_values(path, sets))


def coerce_fields(instance: Any) -> None:
    """Check (and coerce in place) every field of a dataclass instance against its annotation."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        setattr(instance, f.name, coerce(f.name, getattr(instance, f.name), hints[f.name]))


def dataclass_defaults(cls: type) -> dict[str, Any]:
    """Every field's default (required fields left out), as JSON stores them: what a field that a
    stored config lacks stands for."""
    found = {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    return json.loads(json.dumps(found))


def coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation (int, float, bool, str, list[X], dict, X | None)."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    origin = typing.get_origin(annotation)
    if origin is list:
        item = (typing.get_args(annotation) or (Any,))[0]
        if isinstance(value, str):  # "--set seeds=0,1,2" or "tasks=a,b"
            value = [yaml.safe_load(v) if item is not str else v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name} must be a list, got {short(value)}")
        return [coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise UserError(f"{name} must be a mapping, got {short(value)}")
        return dict(value)
    return _scalar(name, value, annotation)


def _scalar(name: str, value: Any, annotation: Any) -> Any:
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(f"{name} must be true or false, got {short(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name} must be an integer, got {short(value)}")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML reads "5e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{name} must be a number, got {short(value)}")
        try:
            return float(value)
        except OverflowError:
            raise UserError(f"{name} must be a finite number, got {short(value)}") from None
    if annotation is str and not isinstance(value, str):
        raise UserError(f"{name} must be a string, got {short(value)}")
    return value


def field_help(cls: type) -> dict[str, str]:
    """Each field's help: its `#:` comments (on the field's lines or right above it), written nowhere else.

    Read from the source of the class and of the dataclasses it inherits fields from, so `--help` and the
    docs site show what the code says; a class whose source is not available (a frozen install) gives {}.
    """
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            found.update(_own_field_help(klass))
    return found


def _own_field_help(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.string.startswith("#:"):
            comments[token.start[0]] = token.string[2:].strip()
    found = {}
    source_lines = source.splitlines()
    statement = ast.parse(source).body[0]
    for node in statement.body if isinstance(statement, ast.ClassDef) else []:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            first = node.lineno  # `#:` lines right above the field belong to it too (Sphinx's rule)
            while first - 1 in comments and source_lines[first - 2].lstrip().startswith("#:"):
                first -= 1
            lines = range(first, (node.end_lineno or node.lineno) + 1)
            text = " ".join(comments[line] for line in lines if line in comments)
            if text:
                found[node.target.id] = text
    return found


def keys_help(cls: type) -> str:
    """Every field of `cls` as "key = default  help" lines: the keys `--set` and a YAML file take."""
    helps, defaults = field_help(cls), dataclass_defaults(cls)
    rows = [
        (f.name, short(defaults[f.name], 30) if f.name in defaults else "(required)") for f in dataclasses.fields(cls)
    ]
    width = max(len(f"{name} = {default}") for name, default in rows)
    return "\n".join(f"  {f'{name} = {default}':<{width}}  {helps.get(name, '')}".rstrip() for name, default in rows)


def short(value: Any, limit: int = 80) -> str:
    """repr of a value for an error line, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
