"""Typed configs from YAML files: one way to read a file and to report what is wrong in it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from editscale.errors import EditscaleError

M = TypeVar("M", bound=BaseModel)


def _yaml_reason(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own message spans several lines)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem or err.context or 'invalid YAML'} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def read_yaml_mapping(path: Path | str, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file is an empty mapping); a `.json` file is read as
    JSON (the reference's hparams files). Errors name the file, in one line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        data = (json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)) or {}
    except OSError as err:
        raise EditscaleError(f"cannot read {what} {path}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise EditscaleError(f"cannot read {what} {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise EditscaleError(f"cannot read {what} {path}: invalid JSON at line {err.lineno}, column {err.colno}: "
                             f"{err.msg}") from None
    except yaml.YAMLError as err:
        raise EditscaleError(f"cannot read {what} {path}: {_yaml_reason(err)}") from None
    except RecursionError:
        raise EditscaleError(f"cannot read {what} {path}: nested too deeply") from None
    if not isinstance(data, dict):
        raise EditscaleError(f"{path}: a {what} is a mapping of fields")
    return data


def validate(cls: type[M], data: dict[str, Any], *, source: str) -> M:
    """`cls` built from `data`; a bad field is an error naming the source and the field."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{_loc(e['loc']) or 'config'}: {' '.join(e['msg'].split())}" for e in err.errors())
        raise EditscaleError(f"{source}: invalid {cls.__name__}: {problems}") from err


def _loc(loc: tuple[Any, ...]) -> str:
    """A field's dotted path; a key that is no plain name (a line break in it, say) is quoted."""
    return ".".join(str(x) if str(x).isprintable() else repr(x) for x in loc)


def cache_root() -> Path:
    """Where editscale keeps what it computes once (statistics, MEND networks, downloads):
    ``$EDITSCALE_CACHE`` if set, else ``~/.cache/editscale``."""
    env = os.environ.get("EDITSCALE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "editscale"
