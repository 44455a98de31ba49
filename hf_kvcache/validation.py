"""Parameter checks shared by every public constructor: type and range, with the parameter, the value and
what is accepted in the message. `bool` is not accepted where an integer is (`True` is not 1 token) and an
integer-valued float is not an integer (`bits=4.0` is refused at construction, not at the first forward).
Commands also check an output folder before any work (`check_writable`).
"""

import tempfile
from collections.abc import Collection
from pathlib import Path


def _refuse(name: str, value: object, accepted: str, hint: str = "") -> None:
    """The one form of every refusal: the parameter, the value, what is accepted, and an optional hint."""
    raise ValueError(f"{name}={value!r} {accepted}{f' ({hint})' if hint else ''}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(
    name: str, value: object, minimum: int = 0, maximum: int | None = None, maximum_name: str = "", hint: str = ""
) -> None:
    """`value` must be an int (not a bool) in [minimum, maximum]; a ValueError names it otherwise."""
    if _is_int(value) and value >= minimum and (maximum is None or value <= maximum):
        return
    if maximum is None:
        _refuse(name, value, f"must be an integer >= {minimum}", hint)
    _refuse(name, value, f"must be an integer between {minimum} and {maximum_name or maximum}", hint)


def check_optional_int(name: str, value: object, minimum: int = 0, hint: str = "") -> None:
    """None, or an int (not a bool) >= minimum."""
    if value is not None and not (_is_int(value) and value >= minimum):
        _refuse(name, value, f"must be None or an integer >= {minimum}", hint)


def check_bool(name: str, value: object) -> None:
    """`value` must be True or False (the string 'no' is not False)."""
    if not isinstance(value, bool):
        _refuse(name, value, "must be True or False")


def check_choice(name: str, value: object, choices: Collection, hint: str = "") -> None:
    """`value` must be one of `choices` (compared by type too: 4.0 is not 4, True is not 1)."""
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        _refuse(name, value, f"is not supported; accepted values: {', '.join(map(str, choices))}", hint)


def check_number(name: str, value: object, minimum: float = 0.0, inclusive: bool = False, unit: str = "") -> None:
    """`value` must be an int or float (not a bool) above `minimum` (or equal to it with `inclusive`)."""
    valid = isinstance(value, int | float) and not isinstance(value, bool)
    if not (valid and (value >= minimum if inclusive else value > minimum)):
        _refuse(name, value, f"must be a number {'>=' if inclusive else '>'} {minimum:g}", unit)


def check_text(name: str, value: object) -> None:
    """`value` must be a non-empty string."""
    if not isinstance(value, str) or not value:
        _refuse(name, value, "must be a non-empty string")


def check_writable(folder: Path, shown: str) -> None:
    """Create `folder` if needed and write a temporary file into it; a ValueError naming `shown` (the option
    and value as the user gave them) if either fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{shown}: cannot write there ({error.strerror or error})") from None
