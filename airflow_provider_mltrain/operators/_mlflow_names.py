"""Validation of MLflow registry names at DAG parse time, without importing mlflow.

The rules mirror MLflow 3's own (``mlflow/utils/validation.py``: ``_validate_model_name``,
``_validate_model_alias_name`` and ``_validate_model_alias_name_reserved``) so a bad name fails when the DAG
is parsed instead of after the training it follows. Model names are held to a little more than MLflow
checks: a name must also survive the ``models:/`` URIs the operator returns and MLflow's search filters.
"""

from __future__ import annotations

import re
from typing import Any

_ALIAS_CHARS = re.compile(r"^[\w\-]+$")
#: Characters a model name cannot carry through a ``models:/`` URI: MLflow parses those URIs with
#: ``urllib.parse.urlparse``, so ``?`` starts a query, ``;`` parameters, ``@`` an alias and ``#`` a
#: fragment in the UI's links, and ``%`` reads as an escape to any tool that decodes the URI.
_URI_BREAKING_CHARS = ("?", "#", "%", ";", "@")
_VERSION_ALIAS = re.compile(r"^[vV]\d+$")
MAX_ALIAS_LENGTH = 255
#: Legacy registry stages a version may be moved to (``None`` is not a target).
LEGACY_STAGES = ("Staging", "Production", "Archived")


def validate_model_name(value: Any, param: str = "model_name") -> str:
    """A registered model name MLflow accepts.

    :param value: the name.
    :param param: the parameter name for the error message.
    :raises ValueError: naming the parameter, the value and the rule.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{param} must be a non-empty string (a registered model name), got {value!r}")
    if "/" in value or ":" in value:
        raise ValueError(
            f"{param} {value!r} is not a valid registered model name: names cannot contain '/' or ':'"
        )
    bad = sorted({c for c in value if c in _URI_BREAKING_CHARS or ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ValueError(
            f"{param} {value!r} cannot be used in MLflow model URIs (models:/<name>/<version>, "
            f"models:/<name>@<alias>): it contains {''.join(bad)!r}; names may not contain "
            f"{' '.join(_URI_BREAKING_CHARS)} or control characters"
        )
    if value != value.strip() or value in (".", ".."):
        raise ValueError(
            f"{param} {value!r} is not a valid registered model name: no leading or trailing spaces, "
            "and not '.' or '..'"
        )
    if "'" in value and '"' in value:
        raise ValueError(
            f"{param} {value!r} contains both ' and \": MLflow's search filters cannot match such a name "
            "(they have no escape character); use at most one kind of quote"
        )
    return value


def validate_alias(value: Any, param: str = "aliases") -> str:
    """A registered model alias MLflow accepts.

    :param value: the alias.
    :param param: the parameter name for the error message.
    :raises ValueError: naming the parameter, the value and the rule.
    """
    if not isinstance(value, str) or not value:
        raise ValueError(f"{param}: an alias must be a non-empty string, got {value!r}")
    if not _ALIAS_CHARS.match(value):
        raise ValueError(
            f"{param}: alias {value!r} is invalid: aliases may only contain letters, digits, '_' and '-'"
        )
    if len(value) > MAX_ALIAS_LENGTH:
        raise ValueError(f"{param}: alias {value[:40]!r}... is longer than {MAX_ALIAS_LENGTH} characters")
    if value.lower() == "latest":
        raise ValueError(
            f"{param}: alias {value!r} is reserved by MLflow ('latest' means the newest version)"
        )
    if _VERSION_ALIAS.match(value):
        raise ValueError(f"{param}: alias {value!r} is reserved by MLflow (v<number> names a version)")
    return value


def validate_stage(value: Any) -> str:
    """A legacy registry stage, returned in MLflow's spelling.

    :param value: ``staging``, ``Production``, ... (case-insensitive).
    :raises ValueError: naming the value and the allowed stages.
    """
    if isinstance(value, str):
        for stage in LEGACY_STAGES:
            if value.strip().lower() == stage.lower():
                return stage
    raise ValueError(f"stage must be one of {list(LEGACY_STAGES)} (or None), got {value!r}")
