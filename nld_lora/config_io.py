"""Typed configs from YAML + dotted `key=value` overrides; unknown keys fail at start with their path."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


_YAML11_WORDS = ("yes", "no", "on", "off", "y", "n")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None) -> Any:
    """A dataclass field whose value must be >= ge (or > gt); None passes where the field is optional."""
    return dataclasses.field(default=default, metadata={"ge": ge, "gt": gt})


def check_ranges(obj: Any, path: str = "") -> None:
    """Every `bounded` field of a config (nested ones too) within its range; the error names the dotted key."""
    for f in dataclasses.fields(obj):
        value, where = getattr(obj, f.name), f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, where)
            continue
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        ge, gt = f.metadata.get("ge"), f.metadata.get("gt")
        if ge is not None and value < ge:
            raise ConfigError(f"{where}: must be >= {ge:g}, got {value!r}")
        if gt is not None and value <= gt:
            raise ConfigError(f"{where}: must be > {gt:g}, got {value!r}")


def writable_dir(path: str | Path) -> Path:
    """Create the output folder if needed and prove it writable now, before any work that would be lost."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{folder}: output folder is not writable ({err.strerror or err})") from err
    return folder


def settings_help(cls: type) -> str:
    """Every key of a config dataclass (dotted for nested ones) with its default, for a command's --help."""
    lines = []

    def walk(klass: type, prefix: str) -> None:
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            key = prefix + f.name
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            bounds = "".join(f" ({op} {f.metadata[k]:g})" for k, op in (("ge", ">="), ("gt", ">"))
                             if f.metadata.get(k) is not None)
            lines.append(f"  {key}={'null' if default is None else default}{bounds}")

    walk(cls, "")
    return "settings (key=value arguments, or keys of the --config YAML):\n" + "\n".join(lines)


def _coerce(value: Any, annotation: Any, path: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first type the value fits (int | str: "3" -> 3, "auto" -> "auto")
            try:
                return _coerce(value, option, path)
            except ConfigError:
                continue
        try:
            return _coerce(value, inner[-1], path)
        except ConfigError as err:
            if len(inner) == 1:
                raise
            names = " or ".join(getattr(a, "__name__", str(a)) for a in inner)
            raise ConfigError(f"{path}: expected {names}, got {value!r}") from err
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(annotation, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if annotation is bool and isinstance(value, str):
        if value.lower() in ("true", "1", "yes", "on"):
            return True
        if value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if annotation in (int, float) and isinstance(value, str):
        try:
            return annotation(value)
        except ValueError as err:
            raise ConfigError(f"{path}: expected {annotation.__name__}, got {value!r}") from err
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, bool):
        raise ConfigError(f"{path}: YAML read {value!r} as a boolean; quote the word (e.g. \"no\")")
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise ConfigError(f"{path}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass cls from a mapping, rejecting unknown keys (named with their dotted path)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        guesses = {u: difflib.get_close_matches(u, names, n=1) for u in unknown}
        named = ", ".join(where + u + (f" (did you mean {where}{guesses[u][0]}?)" if guesses[u] else "")
                          for u in unknown)
        raise ConfigError(f"unknown config key(s): {named}; valid keys{' under ' + path if path else ''}: "
                          f"{sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    obj = cls(**kwargs)
    if not path:
        check_ranges(obj)
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings (value parsed as YAML) onto a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        if not raw.strip():
            raise ConfigError(f"override {item!r}: empty value (leave the key out for its default, or write "
                              f"{key}=null)")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        value = yaml.safe_load(raw)
        if isinstance(value, bool) and raw.strip().lower() in _YAML11_WORDS:
            value = raw.strip()  # `mixed_precision=no` means the string; bool fields accept these words too
        node[parts[-1]] = value
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) + overrides -> dataclass instance."""
    data: dict[str, Any] = {}
    if path is not None:
        from nld_lora.data.readers import PromptFileError, read_text

        try:
            data = yaml.safe_load(read_text(path)) or {}
        except PromptFileError as err:
            raise ConfigError(f"config file {err}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings (key: value) at the top level, got a "
                              f"{type(data).__name__}")
    return from_dict(cls, apply_overrides(data, overrides or []))
