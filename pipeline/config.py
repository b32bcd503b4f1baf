"""Typed job configs: nested dataclasses loaded from YAML and overridden by ``key=value`` arguments.

Every job declares a dataclass whose fields (and nested dataclass fields) are the whole of what it
takes. :func:`load_config` builds it from an optional YAML file plus ``a.b=value`` overrides, checks
every key and type, then calls each dataclass's ``validate()`` (pure: it reads only the config, changes
nothing and does no I/O) and then its ``preflight()`` (the checks that need the world: inputs exist,
optional packages are installed, the launcher's world size fits the batch); any problem raises
:class:`ConfigError` naming the dotted key *before* any work starts. :func:`save_config` writes the
resolved config (with credentials stripped) beside a job's outputs.

Field help text lives in ``field(metadata={"help": ...})`` and is shown by ``--help``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Iterable, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")

_SECRET_KEY_RE = re.compile(r"(secret|password|token|access_key|credential)", re.IGNORECASE)
_URL_CRED_RE = re.compile(r"(?P<scheme>[a-z0-9+.-]+://)(?P<cred>[^/@\s]+)@", re.IGNORECASE)


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type or an impossible value. ``key`` is the dotted name."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (after YAML parsing) and return it converted."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, f"must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError as e:  # try the next alternative
                errors.append(str(e))
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):  # allow a=x,y,z on the command line
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip() != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        _, vt = get_args(tp) or (Any, Any)
        return {str(k): _coerce(f"{key}.{k}", vt, v) for k, v in value.items()}
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
            value = float(value)  # YAML 1.1 reads "2e-3" (no dot) as a string; it is a number here
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return str(value)
    raise ConfigError(key, f"unsupported annotation {tp!r}")


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in names:
            close = [n for n in names if n.startswith(str(k)[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{prefix}{k}", f"unknown key for {cls.__name__}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = _coerce(prefix + f.name, hints[f.name], data[f.name])
        elif _is_dataclass_type(hints[f.name]) and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = _build(hints[f.name], {}, prefix=f"{prefix}{f.name}.")
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        raise ConfigError(prefix + (missing[0] if missing else "?"), f"is required ({e})") from None


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(key, f"'{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> dict:
    """Turn ``["a.b=1", "c=x,y"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise ConfigError(item, "empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _walk(cfg: Any, method: str, prefix: str = "") -> None:
    """Call ``cfg.<method>()`` on ``cfg`` and every nested dataclass (children first), prefixing the key of a
    child's :class:`ConfigError` with the child's dotted path."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            _walk(v, method, prefix=f"{prefix}{f.name}.")
    fn = getattr(cfg, method, None)
    if fn is not None:
        try:
            fn()
        except ConfigError as e:
            if prefix and not e.key.startswith(prefix):
                raise ConfigError(prefix + e.key, str(e).split(": ", 1)[1]) from None
            raise


def validate_tree(cfg: Any) -> None:
    """Call the pure ``validate()`` of ``cfg`` and every nested dataclass (children first).

    Raises:
        ConfigError: naming the dotted key.
    """
    _walk(cfg, "validate")


def preflight_tree(cfg: Any) -> None:
    """Call ``preflight()`` (checks that read files, the environment or installed packages) of ``cfg`` and
    every nested dataclass (children first), after :func:`validate_tree`.

    Raises:
        ConfigError: naming the dotted key.
    """
    _walk(cfg, "preflight")


def load_config(cls: type[T], path: str | None = None, overrides: Iterable[str] = (),
                base: dict | None = None, preflight: bool = True) -> T:
    """Build a job config from YAML + overrides, validate it and (``preflight``) run its preflight checks.

    Args:
        cls: the job's dataclass.
        path: optional YAML file (local path or fsspec URL); its top level maps to ``cls`` fields.
        overrides: ``key=value`` strings; dotted keys reach nested sections; values parse as YAML.
        base: optional dict applied before the YAML (used by the quickstart to chain jobs).
        preflight: also run :func:`preflight_tree` (False: only the pure checks, e.g. for a config meant
            for another machine or world size).
    Raises:
        ConfigError: unknown key, wrong type, or a value that ``validate()`` rejects, naming the key.
    """
    data: dict = dict(base or {})
    if path:
        import fsspec

        with fsspec.open(path, "r") as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ConfigError("<root>", f"{path} must hold a mapping, not {type(loaded).__name__}")
        data = _merge(data, loaded)
    data = _merge(data, parse_overrides(overrides))
    cfg = _build(cls, data)
    validate_tree(cfg)
    if preflight:
        preflight_tree(cfg)
    return cfg


def redact(value: Any, key: str = "") -> Any:
    """Strip credentials from a config tree: secret-looking keys and ``user:pass@`` in URLs."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if key and _SECRET_KEY_RE.search(key) and value:
            return "<redacted>"
        return _URL_CRED_RE.sub(lambda m: m.group("scheme") + "<redacted>@", value)
    return value


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML-able data, credentials redacted."""
    return redact(dataclasses.asdict(cfg))


def save_config(cfg: Any, url: str) -> None:
    """Write the resolved, redacted config as YAML to ``url`` (any fsspec URL), atomically."""
    from polymae.datasets.storage import write_bytes_atomic

    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    write_bytes_atomic(url, text.encode())


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """Rows ``(dotted key, default, help)`` for ``--help``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, prefix=f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "<required>"
        rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows


def help_text(cls: type) -> str:
    """The ``--help`` epilog: every dotted config key with its help and default."""
    rows = describe(cls)
    width = max(len(r[0]) for r in rows) + 2
    lines = []
    for key, default, hlp in rows:
        lines.append(f"  {key:<{width}}{hlp} [default: {default}]")
    return "config keys (set with key=value, nested with a.b=value):\n" + "\n".join(lines)


def field_(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:  # noqa: A002
    """``dataclasses.field`` with help text; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        d = default
        return dataclasses.field(default_factory=lambda: type(d)(d), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)
