"""Type checks shared by every layer that validates user input: bools are not numbers here."""

from __future__ import annotations

import numbers


def is_int(value: object) -> bool:
    """Whether `value` is an integer (`True` is a mistake for a count, not the number 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether `value` is a real number other than a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
