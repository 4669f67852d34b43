"""Small value checks shared by every typed config: each error names the full key and what it must be.

    number("evaluate.n_examples", -3, integer=True, low=1)   # ValueError: evaluate.n_examples=-3 must be >= 1
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def number(key: str, value: Any, *, integer: bool = False, low: float | None = None, high: float | None = None,
           optional: bool = False, open_low: bool = False, open_high: bool = False) -> Any:
    """A finite number (an int when `integer`) in [low, high]; open_low / open_high exclude the ends."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key} must be set (got null)")
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{key}={value!r} must be {'an integer' if integer else 'a number'}, not "
                         f"{type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{key}={value!r} must be finite")
    if low is not None and (value < low or (open_low and value == low)):
        raise ValueError(f"{key}={value!r} must be {'>' if open_low else '>='} {low}")
    if high is not None and (value > high or (open_high and value == high)):
        raise ValueError(f"{key}={value!r} must be {'<' if open_high else '<='} {high}")
    return value


def fraction(key: str, value: Any, *, optional: bool = False, open_low: bool = True) -> Any:
    """A number in (0, 1] (or [0, 1] with open_low=False): budgets, shares, probabilities."""
    return number(key, value, low=0.0, high=1.0, optional=optional, open_low=open_low)


def choice(key: str, value: Any, options: Iterable[Any]) -> Any:
    options = list(options)
    if value not in options:
        raise ValueError(f"{key}={value!r}; choose one of {options}")
    return value


def flag(key: str, value: Any, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r} must be true or false")
    return value


def text(key: str, value: Any, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}={value!r} must be a non-empty string")
    return value


def numbers(key: str, values: Any, *, optional: bool = False, nonempty: bool = True, **bounds: Any) -> Any:
    """A list of numbers, each checked as `number(key[i], ...)`."""
    if values is None:
        if optional:
            return None
        raise ValueError(f"{key} must be a list (got null)")
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise ValueError(f"{key}={values!r} must be a list")
    if nonempty and not values:
        raise ValueError(f"{key} must not be empty")
    for i, v in enumerate(values):
        number(f"{key}[{i}]", v, **bounds)
    return values


def read_json_object(path: Any, what: str, error: type[Exception] = ValueError, hint: str = "") -> dict[str, Any]:
    """A JSON file that must hold an object (manifests, configs, records): bad bytes, bad JSON or another JSON type
    raise `error` naming the file, what it should be, and `hint` (the fix)."""
    import json
    from pathlib import Path

    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: this {what} is not valid JSON ({err}){suffix}") from err
    if not isinstance(data, dict):
        raise error(f"{path}: a {what} must be a JSON object, this one is a {type(data).__name__}{suffix}")
    return data


def runtime_part(cls: type, value: Any, argument: str, error: type[Exception] = ValueError) -> Any:
    """A cache-runtime argument of generate() (monitor=, memory=, dynamic_blocks=) as `cls` or None (off): an
    instance, a dict of its fields, True (its defaults) or None/False; an instance or dict with enabled=False is off."""
    from dataclasses import fields

    if value is None or value is False:
        return None
    if value is True:
        value = cls()
    elif isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise error(f"{argument}: unknown keys {unknown}; known: {sorted(known)}")
        value = cls(**value)
    elif not isinstance(value, cls):
        raise error(f"{argument}={value!r}: pass a {cls.__name__}, a dict of its fields, True or None")
    return value if value.enabled else None
