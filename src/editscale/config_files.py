"""Typed configs from YAML files: one way to read a file and to report what is wrong in it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from editscale.errors import EditscaleError

M = TypeVar("M", bound=BaseModel)


def read_yaml_mapping(path: Path | str, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file is an empty mapping); errors name the file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise EditscaleError(f"cannot read {what} {path}: {err}") from err
    if not isinstance(data, dict):
        raise EditscaleError(f"{path}: a {what} is a mapping of fields")
    return data


def validate(cls: type[M], data: dict[str, Any], *, source: str) -> M:
    """`cls` built from `data`; a bad field is an error naming the source and the field."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in err.errors())
        raise EditscaleError(f"{source}: invalid {cls.__name__}: {problems}") from err


def cache_root() -> Path:
    """Where editscale keeps what it computes once (statistics, MEND networks, downloads):
    ``$EDITSCALE_CACHE`` if set, else ``~/.cache/editscale``."""
    env = os.environ.get("EDITSCALE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "editscale"
