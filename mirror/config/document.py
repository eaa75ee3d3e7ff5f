"""Reading the YAML file: scalars kept as text, problems as one-line ConfigErrors."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import yaml

from mirror.config.errors import ConfigError
from mirror.config.parsers import _kind


class _TextScalarLoader(yaml.SafeLoader):
    """Keeps numbers, booleans and dates as their text; the parsers decide what they mean."""

    yaml_constructors: ClassVar[dict[Any, Any]] = {
        **yaml.SafeLoader.yaml_constructors,
        **{
            f"tag:yaml.org,2002:{tag}": yaml.SafeLoader.construct_scalar
            for tag in ("bool", "int", "float", "timestamp")
        },
    }


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The document as a mapping, with file and syntax problems as one-line ConfigErrors."""
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as stream:
            document = yaml.load(stream, Loader=_TextScalarLoader)  # a SafeLoader subclass
    except OSError as exc:
        raise ConfigError(name, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(name, "cannot read: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(name, _yaml_problem(exc)) from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(name, f"expected a mapping at the top level, got {_kind(document)}")
    return document


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"invalid YAML{where}: {problem}"


def _expand_shorthands(raw: dict[str, Any]) -> dict[str, Any]:
    """distribution accepts ``storage: inmemory`` and ``auth: silly``: a bare name, no params."""
    raw = dict(raw)
    for section in ("storage", "auth"):
        if isinstance(raw.get(section), str):
            raw[section] = {raw[section]: None}
    return raw
