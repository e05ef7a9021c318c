"""How an option is declared, once: settings dataclasses whose fields (:func:`option`) carry their help text and their
checks, read from nested dicts (:func:`build_settings`: a run config's sections) and turned into command-line options.

A stage's settings (:class:`~concept_influence.curvature.CurvatureSettings`,
:class:`~concept_influence.engine.ScoringSettings`) are taken by the Python API, make up the run config's
``[factors]`` and ``[scoring]`` sections (subclasses that add the keys only a run folder needs), give the CLI
its help on those sections, and are saved next to a stage's output in a run folder and compared when the
stage resumes (:meth:`concept_influence.runs.Run.check_settings`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["option", "narrowed", "check_value", "accepts", "describe_type", "Settings", "settings_diff", "build_settings",
           "resolve_path", "KEYWORDS"]


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
           minimum: int | None = None, path: bool = False) -> Any:
    """A dataclass field with its ``help`` text, allowed ``choices``, an integer ``minimum`` (an optional field's
    None is always allowed), and whether it is a file path (resolved against a config file's folder)."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "choices": choices, "minimum": minimum, "path": path})


def narrowed(cls: type, name: str, choices: tuple) -> Any:
    """Field ``name`` of ``cls`` again (default and help text), allowing only ``choices``: for a subclass
    that accepts fewer values than the API."""
    base = {f.name: f for f in dataclasses.fields(cls)}[name]
    return dataclasses.field(default=base.default, metadata={**base.metadata, "choices": choices})


def check_value(name: str, value: Any, f: dataclasses.Field) -> str | None:
    """Why ``value`` is not allowed for field ``f`` (None when it is)."""
    choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
    if choices and value not in choices:
        return f"'{name}' must be one of {', '.join(map(str, choices))}; got {value!r}"
    if minimum is not None and value is not None and value < minimum:
        return f"{name} must be >= {minimum}, got {value}"
    return None


def accepts(value: Any, hint: Any) -> bool:
    """Whether ``value`` (read from TOML or JSON) is of the type hint ``hint`` (a bool is no number)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(accepts(v, item) for v in value)
    return isinstance(value, hint)


def describe_type(hint: Any) -> str:
    """The type hint ``hint`` in words, for errors: ``a string or null``."""
    args = typing.get_args(hint) or (hint,)
    return " or ".join("null" if a is type(None) else {str: "a string", int: "an integer", float: "a number",
                                                       bool: "true/false"}.get(a, a.__name__) for a in args)


def settings_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every key whose value differs (nested dicts as ``a.b``), sorted by key."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


class Settings:
    """Base of the settings dataclasses: checks each field on creation, then the fields together
    (:meth:`check_together`), a ``ValueError`` naming the field; and converts to and from plain dicts."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            problem = check_value(f.name, getattr(self, f.name), f)
            if problem:
                raise ValueError(problem)
        self.check_together()

    def check_together(self) -> None:
        """Checks across fields, run on creation after each field's own. A subclass with any overrides this (calling
        its base's when the base has checks) instead of ``__post_init__``, so that creating the settings of a
        subpackage (:class:`~concept_influence.curvature.CurvatureSettings`) does not call back up into this module."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        """A copy with ``changes``; an unknown name is a ``TypeError`` that names it."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"{type(self).__name__} has no setting {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes) if changes else self

    def project(self, cls: type):
        """The fields of settings class ``cls`` (a base of this class) as a ``cls`` instance."""
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def help_lines(cls, prefix: str = "") -> list[str]:
        """One line per field: ``prefix.name = default  help (choices)``, for help texts."""
        lines = []
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices")
            default = "unset" if f.default is None else json.dumps(f.default)
            extra = f" ({' | '.join(map(str, choices))})" if choices else ""
            lines.append(f"{prefix}{f.name} = {default}: {f.metadata.get('help', '')}{extra}")
        return lines


def build_settings(cls, data: Any, source: str, error: type[Exception], prefix: str = "", base: Path | None = None):
    """Settings class ``cls`` (nested settings classes as sections) from the nested dict ``data`` read from ``source``
    (a file, named in errors): unknown keys (with close matches), missing keys, values of the wrong type or out of
    range and checks across fields are an ``error`` naming the source and the key. Path-valued fields are resolved
    against ``base`` (a relative path; :data:`KEYWORDS` are kept)."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise error(f"{source}: {where} must be a table of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(fields)})"
            raise error(f"{source}: unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise error(f"{source}: missing key '{key}'")
            continue
        value, hint = data[name], hints[name]
        section = next((h for h in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(h)), None)
        if section is not None:
            kwargs[name] = None if value is None and section is not hint else build_settings(section, value, source, error,
                                                                                               f"{key}.", base)
            continue
        if not accepts(value, hint):
            raise error(f"{source}: '{key}' must be {describe_type(hint)}, got {value!r}")
        problem = check_value(key, value, f)
        if problem:
            raise error(f"{source}: {problem}")
        if f.metadata.get("path") and base is not None:
            value = [resolve_path(v, base) for v in value] if isinstance(value, list) else resolve_path(value, base)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except error as e:
        raise error(f"{source}: {e}") from None
    except ValueError as e:  # a check of a settings class across fields, e.g. the damping
        raise error(f"{source}: {prefix}{e}") from None


#: Path-valued keys may hold these words instead of a path (``checkpoints``).
KEYWORDS = ("auto", "base")


def resolve_path(value: Any, base: Path) -> Any:
    """A relative path resolved against ``base``; None and :data:`KEYWORDS` unchanged."""
    if not isinstance(value, str) or value in KEYWORDS or Path(value).is_absolute():
        return value
    return str((base / value).resolve())
