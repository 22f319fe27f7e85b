"""Config dataclasses: YAML supplies values, dataclasses own defaults, documentation and validation.

Every field is declared with :func:`option`, which carries its help text (shown by ``mmalign <domain> <job>
--help``). ``__post_init__`` validates with the ``check_*`` helpers, which raise ``ValueError`` naming the field, the
value and what is allowed, so a bad value fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

__all__ = [
    "option",
    "Config",
    "check_positive",
    "check_nonnegative",
    "check_range",
    "check_choice",
    "check_probability",
    "parse_overrides",
    "load_config",
    "config_help",
]

C = TypeVar("C", bound="Config")
_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, factory: Any = _MISSING) -> Any:  # noqa: A002
    """A dataclass field with a help string (the field's documentation)."""
    if not help:
        raise ValueError("every config field needs a help string")
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if factory is not _MISSING:
        kwargs["default_factory"] = factory
    elif default is not _MISSING:
        if isinstance(default, (list, dict, set)):
            kwargs["default_factory"] = lambda d=default: type(d)(d)
        else:
            kwargs["default"] = default
    return dataclasses.field(**kwargs)


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        _fail(name, value, "a finite number > 0")


def check_nonnegative(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        _fail(name, value, "a finite number >= 0")


def check_range(
    name: str, value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> None:
    """Check ``low <= value <= high`` (open ends with ``low_open``/``high_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        _fail(name, value, f"in {lo}{low}, {high}{hi}")


def check_probability(name: str, value: float) -> None:
    check_range(name, value, 0.0, 1.0)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        _fail(name, value, f"one of {choices}")


@dataclasses.dataclass
class Config:
    """Base class of every mmalign config dataclass."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None) -> C:
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names, key=str)  # key=str: a YAML file may hold non-string keys
        if unknown:
            raise _UnknownFieldsError(unknown, cls.__name__, sorted(names))
        kwargs: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in data.items():
            tp = hints[key]
            if _is_config_type(tp) and isinstance(value, dict):
                # a partial mapping updates this class's default for the nested config, not the nested defaults
                f = fields[key]
                if f.default_factory is not _MISSING:  # type: ignore[misc]
                    value = _merge(f.default_factory().to_dict(), value)  # type: ignore[misc]
                elif isinstance(f.default, Config):
                    value = _merge(f.default.to_dict(), value)
            kwargs[key] = _coerce(key, value, tp)
        return cls(**kwargs)


class _UnknownFieldsError(ValueError):
    """Unknown config keys; a nesting config re-raises it with dotted names (``trainer.foo``)."""

    def __init__(self, names: list[Any], owner: str, allowed: list[str]) -> None:
        self.names, self.owner, self.allowed = names, owner, allowed
        super().__init__(f"unknown field(s) {names} for {owner}; allowed: {allowed}")


def _is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Config)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert YAML/CLI values into the annotated type (ints to floats, lists to tuples, nested configs)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last_err: Exception | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except (TypeError, ValueError) as err:
                last_err = err
        raise ValueError(f"{name}: cannot use {value!r} as {tp}") from last_err
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if _is_config_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping for {tp.__name__}, got {value!r}")
        # name the nested field in every error: trainer.lr must be ..., unknown field(s) ['trainer.foo']
        try:
            return tp.from_dict(value)
        except _UnknownFieldsError as err:
            raise _UnknownFieldsError([f"{name}.{n}" for n in err.names], err.owner, err.allowed) from None
        except ValueError as err:
            raise ValueError(f"{name}.{err}") from None
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on"}:
            return True
        if isinstance(value, str) and value.lower() in {"false", "0", "no", "off"}:
            return False
        raise ValueError(f"{name} must be a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
            if as_float.is_integer():
                return int(as_float)
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    if tp is Path:
        return Path(value)
    return value


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 booleans: only true/false (any case) are booleans, so ``no``, ``off``, ``yes``
    and ``on`` stay strings (``trainer.mixed_precision=no`` is the string ``"no"``, not ``False``)."""
    import yaml

    return yaml.load(text, Loader=_yaml12_loader())  # noqa: S506 - a SafeLoader subclass


@functools.lru_cache(maxsize=1)
def _yaml12_loader() -> Any:
    """A ``yaml.SafeLoader`` subclass whose implicit bool and float resolvers follow YAML 1.2."""
    import re

    import yaml

    class Yaml12Loader(yaml.SafeLoader):
        pass

    replaced = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int"}
    Yaml12Loader.yaml_implicit_resolvers = {
        key: [(tag, rx) for tag, rx in value if tag not in replaced]
        for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|false)$", re.IGNORECASE),
                                       list("tTfF"))
    # YAML 1.2 integers (registered before floats: the first matching resolver wins): 010 is ten (YAML 1.1: octal
    # 8), 1:30 a string (YAML 1.1: sexagesimal 90); 0o17 and 0x1F kept
    Yaml12Loader.add_implicit_resolver(
        "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
    # YAML 1.2 floats: 1e-3 is a float (YAML 1.1 needs a dot, 1.0e-3, and reads 1e-3 as a string)
    Yaml12Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                   r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))

    def construct_int(loader: Any, node: Any) -> int:
        text = str(loader.construct_scalar(node)).replace("_", "")
        if text[:2] in ("0o", "0x"):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text, 10)

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> Any:
        # a key given twice is refused (PyYAML keeps the last one silently)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable keys are refused by PyYAML itself
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Yaml12Loader.add_constructor("tag:yaml.org,2002:int", construct_int)
    Yaml12Loader.construct_mapping = construct_mapping  # type: ignore[method-assign]
    return Yaml12Loader


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return _yaml_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ``["a=1", "trainer.lr=3e-4"]`` into a nested dict; values are parsed as YAML scalars.

    A named part with fields (``teacher=mistake teacher.eps_mistake=0.2``, in any order) becomes
    ``{"teacher": {"name": "mistake", "eps_mistake": 0.2}}``.

    An empty value (``cache_dir=``, what a shell leaves of ``cache_dir=''``) is the empty string; ``null`` or ``~``
    give ``None``.
    """
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override must look like key=value, got {item!r}")
        key, text = item.split("=", 1)
        if not key:
            raise ValueError(f"override has an empty key: {item!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node.get(part), str):  # `teacher=mistake teacher.eps_mistake=0.2`: a named part + fields
                node[part] = {"name": node[part]}
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier override of {part!r}")
        value = _parse_scalar(text) if text.strip() else ""
        if isinstance(value, str) and isinstance(node.get(parts[-1]), dict) and value:
            node[parts[-1]] = {**node[parts[-1]], "name": value}  # fields given first, then the part's name
        else:
            node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), str) and "name" not in value:
            out[key] = {"name": out[key], **value}  # a named part (`teacher: mistake`) given fields by overrides
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: Sequence[str] = (), *, job: str | None = None
) -> C:
    """Build ``cls`` from an optional YAML file plus ``key=value`` overrides (validated on construction).

    With ``job``, the file may carry a top-level ``job:`` naming that job (as the ``config.yaml`` a run folder
    holds does); it must match and is not a field.
    """
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = _yaml_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at top level, got {type(loaded).__name__}")
        if job is not None and "job" in loaded and "job" not in {f.name for f in dataclasses.fields(cls)}:
            if loaded["job"] != job:
                raise ValueError(f"config file {path} is for job {loaded['job']!r}, not {job!r}")
            loaded = {k: v for k, v in loaded.items() if k != "job"}
        data = loaded
    data = _merge(data, parse_overrides(overrides))
    return cls.from_dict(data)


def config_help(cls: type[Config], prefix: str = "") -> list[str]:
    """One line per field (``name (type, default): help``), nested configs flattened with dots."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_config_type(tp):
            lines.extend(config_help(tp, prefix=f"{prefix}{f.name}."))
            continue
        if f.default is not _MISSING:
            default = repr(f.default)
        elif f.default_factory is not _MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "required"
        # generics in full (list[str], Literal['sac', 'ppo']): their __name__ drops the item type and the choices
        tname = str(tp).replace("typing.", "") if typing.get_args(tp) else getattr(tp, "__name__", str(tp))
        lines.append(f"  {prefix}{f.name} ({tname}, default {default}): {f.metadata.get('help', '')}")
    return lines
