"""Whether a parameter value is still unrendered, so its checks wait until Airflow has rendered it.

Two questions with two answers, used by every operator and sensor of this provider:

- :func:`is_jinja_template`: a *string* Airflow renders with Jinja before ``execute``. Where only
  strings are deferred (a threshold bound, a sensor's URI), anything else is checked at once.
- :func:`renders_later`: any value Airflow replaces before ``execute``: a Jinja string, or an
  ``XComArg`` / mapped argument (``task.output``, ``.expand(...)`` values).
"""

from __future__ import annotations

from typing import Any


def is_jinja_template(value: Any) -> bool:
    """True for a string holding a Jinja expression or statement (``{{ ... }}`` / ``{% ... %}``).

    :param value: a parameter value; anything but a string is not a Jinja template.
    """
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def renders_later(value: Any) -> bool:
    """True for a value Airflow resolves before ``execute``: a Jinja string, an ``XComArg`` or a mapped argument.

    Resolvables are recognised by the two methods of Airflow's ``ResolveMixin`` (``resolve`` and
    ``iter_references``), so this module never imports the SDK's internals.

    :param value: a parameter value.
    """
    if isinstance(value, str):
        return is_jinja_template(value)
    return hasattr(value, "resolve") and hasattr(value, "iter_references")
