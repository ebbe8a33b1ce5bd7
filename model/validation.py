"""Type checks shared by every layer that validates user input: bools are not numbers here."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar, TypeVar

FieldsT = TypeVar("FieldsT", bound="DictFields")


def is_int(value: object) -> bool:
    """Whether `value` is an integer (`True` is a mistake for a count, not the number 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """Whether `value` is a real number other than a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class DictFields:
    """`to_dict` / `from_dict` for a config dataclass; unknown keys are refused, naming them
    (so a typo in a saved file or a request does not pass silently)."""

    unknown_keys_error: ClassVar[type[ValueError]] = ValueError
    unknown_keys_label: ClassVar[str] = "unknown keys"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[FieldsT], data: dict[str, Any]) -> FieldsT:
        """Build from a dict of the fields."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise cls.unknown_keys_error(f"{cls.unknown_keys_label}: {', '.join(unknown)}")
        return cls(**data)
