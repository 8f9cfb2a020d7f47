"""Typed configuration: dataclasses + YAML presets holding deltas + ``key=value`` overrides.

    cfg = load_config(PretrainConfig, ["pretrain/presets/moco_v2.yaml"], ["optim.lr=0.06", "loss.tau=0.1"])

- A preset is a YAML mapping; ``_base_: other.yaml`` (relative to the preset) is merged first, so presets state
  only their deltas over a base, as detectron2 configs do.
- Overrides are ``dotted.key=value``; the value is parsed as YAML (``1e-3``, ``true``, ``[1, 2]``, ``null``), except
  for a field typed as a string or a choice of strings, which takes the text as written (``model.shuffle_bn=off``
  is the choice ``off``, not YAML's ``False``; ``'off'`` with quotes works too).
- Unknown keys and wrong types are rejected with one line naming the key and the allowed keys/type.
- A dataclass may define ``validate(self)`` raising :class:`UserError` for out-of-range values; it runs after
  every load.
- A section whose keys depend on one of its values (the loss's hyper-parameters on ``loss.name``) is typed as a
  dataclass with a classmethod ``config_variant(data)`` returning the dataclass (a subclass) to build from
  ``data``.
- :func:`to_dict` gives the resolved config saved with every output.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from ctbench.errors import UserError

T = TypeVar("T")


def read_mapping(path: str | Path, missing: str = "config file not found: {path}",
                 not_mapping: str = "{path}: a config file must hold a mapping, got {type}") -> dict:
    """One YAML file that must hold a mapping (empty = {}); one-line errors, ``missing`` / ``not_mapping`` are
    their texts with ``{path}`` and ``{type}`` filled in."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing.format(path=path))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise UserError(not_mapping.format(path=path, type=type(data).__name__))
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML preset, resolving ``_base_`` chains (relative paths are relative to the file)."""
    path = Path(path)
    data = read_mapping(path)
    base = data.pop("_base_", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else list(base)
    merged: dict = {}
    for b in bases:
        merged = deep_merge(merged, read_yaml((path.parent / b).resolve()))
    return deep_merge(merged, data)


def deep_merge(a: Mapping, b: Mapping) -> dict:
    """``b`` over ``a``; nested mappings merge, everything else is replaced."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(items: Iterable[str]) -> dict:
    """``["optim.lr=0.1", "loss.tau=0.2"]`` -> ``{"optim": {"lr": 0.1}, "loss": {"tau": 0.2}}``."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.03)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise UserError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = value
    return out


def load_config(cls: type[T], presets: Sequence[str | Path] | str | Path | None = None,
                overrides: Iterable[str] = (), extra: Mapping | None = None) -> T:
    """Defaults of ``cls`` <- presets (in order) <- ``extra`` <- overrides; validated."""
    if isinstance(presets, (str, Path)):
        presets = [presets]
    data: dict = {}
    for p in presets or []:
        data = deep_merge(data, read_yaml(p))
    if extra:
        data = deep_merge(data, extra)
    overrides = list(overrides)
    parsed = parse_overrides(overrides)
    for item in overrides:  # string-typed fields keep the text: "off" is a choice, not YAML's False
        key, raw = item.split("=", 1)
        if _is_string_field(cls, key.strip().split(".")):
            node = parsed
            *head, last = key.strip().split(".")
            for part in head:
                node = node[part]
            try:
                text = yaml.safe_load(raw)  # a quoted value loses its quotes
            except yaml.YAMLError:
                text = None
            node[last] = text if isinstance(text, str) else raw.strip()
    data = deep_merge(data, parsed)
    return from_dict(cls, data)


def _is_string_field(cls: Any, parts: list[str]) -> bool:
    """Whether ``cls.<parts>`` is typed ``str`` or a Literal of strings (optionally ``| None``)."""
    tp: Any = cls
    for part in parts:
        if not (dataclasses.is_dataclass(tp) and isinstance(tp, type)):
            return False
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return False
        tp = hints[part]
    args = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (typing.Union, types.UnionType) \
        else [tp]
    if len(args) != 1:
        return False
    tp = args[0]
    return tp is str or (get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp)))


def from_dict(cls: type[T], data: Mapping, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` strictly (unknown keys and wrong types raise UserError)."""
    if not isinstance(data, Mapping):
        raise UserError(f"{where or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        raise UserError(f"unknown config key {_join(where, key)!r}; choose from {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], _join(where, name))
        elif dataclasses.is_dataclass(hints[name]) and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            kwargs[name] = from_dict(hints[name], {}, _join(where, name))
    obj = cls(**kwargs)
    _validate(obj)
    return obj


def _validate(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            _validate(v)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise UserError(f"{where} = {value!r} is not allowed; choose from {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        value = value if value is not None else {}
        if hasattr(tp, "config_variant") and isinstance(value, Mapping):
            tp = tp.config_variant(value)
        return from_dict(tp, value, where)
    if origin in (list, tuple, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise UserError(f"{where} must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise UserError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise UserError(f"{where} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where} must be a number, got {value!r}")
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise UserError(f"{where} must be a number, got {value!r}") from None
        if not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where} must be a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(str(value))
    return value


def to_dict(obj: Any) -> Any:
    """Plain (JSON/YAML-serialisable) form of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def config_differences(old: Mapping, new: Any, resumable: Sequence[str] = (), default: Any = None) -> list[str]:
    """``key: old -> new`` for every key where the stored config ``old`` (a dict, e.g. a checkpoint's) and the config
    dataclass ``new`` differ, skipping the keys under ``resumable``. A key ``old`` lacks (written before the key
    existed) counts as its default in ``default`` (default: ``type(new)()``): the value that run used."""
    out: list[str] = []

    def walk(a: object, b: object, default: object, where: str) -> None:
        if under(where, resumable):
            return
        if isinstance(a, dict) and isinstance(b, dict):
            d = default if isinstance(default, dict) else {}
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, d.get(k)), b.get(k), d.get(k), f"{where}.{k}" if where else k)
        elif a != b:
            out.append(f"{where}: {a!r} -> {b!r}")

    walk(dict(old), to_dict(new), to_dict(default if default is not None else type(new)()), "")
    return out


def under(key: str, prefixes: Iterable[str]) -> bool:
    """Whether the dotted ``key`` is one of ``prefixes`` or lies below one (``optim.lr`` is under ``optim``)."""
    return any(key == k or key.startswith(k + ".") for k in prefixes)


def flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    """A nested mapping as ``{"a.b.c": value}`` (what config comparisons and the protocol deviations list)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fmt_value(v: object) -> str:
    """A config value as the deviation texts write it: ``[a, b]`` lists, ``%g`` floats."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def check(cond: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``cond`` (for ``validate`` methods)."""
    if not cond:
        raise UserError(message)
