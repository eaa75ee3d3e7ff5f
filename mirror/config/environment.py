"""REGISTRY_* environment overrides, resolved against the key tree as distribution does."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from mirror.config.document import _TextScalarLoader, _yaml_problem
from mirror.config.errors import ConfigError
from mirror.config.tree import IGNORE, _Refuse


def _env_path(tokens: list[str], node: Any) -> tuple[str, ...] | None:
    """Resolves REGISTRY_ name parts to a key path; longest match first, since ours have "_"."""
    path: list[str] = []
    i = 0
    while i < len(tokens):
        if node == IGNORE or isinstance(node, _Refuse):  # free-form below, as distribution's
            return (*path, *(token.lower() for token in tokens[i:]))  # parameter maps are
        if not isinstance(node, dict):
            return None
        for j in range(len(tokens), i, -1):
            name = "_".join(tokens[i:j]).lower()
            if name in node:
                break
        else:
            return None
        path.append(name)
        node, i = node[name], j
    return tuple(path)


def _env_value(name: str, text: str, key: str) -> Any:
    """Text as given; "" = unset; ``[...]``/``{...}`` is YAML flow so lists can be set."""
    if not text.strip():
        return None
    if not text.lstrip().startswith(("[", "{")):
        return text
    try:
        return yaml.load(text, Loader=_TextScalarLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"{name}: {_yaml_problem(exc)}") from None


def _set_path(raw: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Sets a nested key, copying each mapping on the way so YAML aliases are not mutated."""
    node = raw
    for name in path[:-1]:
        child = node.get(name)
        node[name] = dict(child) if isinstance(child, dict) else {}
        node = node[name]
    node[path[-1]] = value


def _apply_env(
    raw: dict[str, Any], environ: Mapping[str, str], schema: dict[str, Any]
) -> list[str]:
    """Applies REGISTRY_* overrides in place, parents before children; returns unknown names."""
    found = []
    for name, text in environ.items():
        if name.startswith("REGISTRY_"):
            found.append((_env_path(name[len("REGISTRY_") :].split("_"), schema), name, text))
    unknown = []
    for path, name, text in sorted(found, key=lambda item: (len(item[0] or ()), item[1])):
        if path is None and name.startswith(("REGISTRY_AUTH_", "REGISTRY_HTTP_TLS_")):
            raise ConfigError(f"env:{name}", "names no key of auth or http.tls the node can honour")
        if path is None or path == ("version",):  # distribution never lets env set the version
            unknown.append(f"env:{name}")
        else:
            _set_path(raw, path, _env_value(name, text, ".".join(path)))
    return unknown
