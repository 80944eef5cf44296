"""Eager argument checks whose messages quote what was received (Keras style)."""

from __future__ import annotations

import numbers


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer. Received: {name}={value!r}")
    return int(value)


def non_negative_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"`{name}` must be a non-negative number. Received: {name}={value!r}")
    return float(value)


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number. Received: {name}={value!r}")
    return float(value)


def float_in_range(name: str, value, low: float, high: float, *, low_open=False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"`{name}` must be in {bracket}{low}, {high}]. Received: {name}={value!r}")
    return float(value)


def one_of(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"`{name}` must be one of {sorted(options)}. Received: {name}={value!r}")
    return value


def float_in_open_range(name: str, value, low: float, high: float) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and low < value < high
    if not ok:
        raise ValueError(f"`{name}` must be in ({low}, {high}). Received: {name}={value!r}")
    return float(value)


def positive_finite_float(name: str, value) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and 0 < value < float("inf")):
        raise ValueError(f"`{name}` must be a positive finite number. Received: {name}={value!r}")
    return float(value)


def finite_float_above(name: str, value, low: float) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and low < value < float("inf")):
        raise ValueError(
            f"`{name}` must be a finite number above {low}. Received: {name}={value!r}"
        )
    return float(value)
