"""Parameter checks shared by every public constructor: type and range, with the parameter, the value and
what is accepted in the message. `bool` is not accepted where an integer is (`True` is not 1 token) and an
integer-valued float is not an integer (`bits=4.0` is refused at construction, not at the first forward).
"""

from collections.abc import Collection


def check_int(name: str, value: object, minimum: int = 0, maximum: int | None = None, maximum_name: str = "") -> None:
    """`value` must be an int (not a bool) in [minimum, maximum]; a ValueError names it otherwise."""
    valid = isinstance(value, int) and not isinstance(value, bool)
    if valid and value >= minimum and (maximum is None or value <= maximum):
        return
    accepted = f"an integer >= {minimum}"
    if maximum is not None:
        accepted = f"an integer between {minimum} and {maximum_name or maximum}"
    raise ValueError(f"{name}={value!r} must be {accepted}")


def check_optional_int(name: str, value: object, minimum: int = 0) -> None:
    """None, or an int (not a bool) >= minimum."""
    if value is not None:
        try:
            check_int(name, value, minimum)
        except ValueError:
            raise ValueError(f"{name}={value!r} must be None or an integer >= {minimum}") from None


def check_bool(name: str, value: object) -> None:
    """`value` must be True or False (the string 'no' is not False)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")


def check_choice(name: str, value: object, choices: Collection) -> None:
    """`value` must be one of `choices` (compared by type too: 4.0 is not 4, True is not 1)."""
    if not any(type(value) is type(choice) and value == choice for choice in choices):
        accepted = ", ".join(map(str, choices))
        raise ValueError(f"{name}={value!r} is not supported; accepted values: {accepted}")


def check_number(name: str, value: object, minimum: float = 0.0, inclusive: bool = False, unit: str = "") -> None:
    """`value` must be an int or float (not a bool) above `minimum` (or equal to it with `inclusive`)."""
    valid = isinstance(value, int | float) and not isinstance(value, bool)
    if valid and (value >= minimum if inclusive else value > minimum):
        return
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    raise ValueError(f"{name}={value!r} must be a number {bound}{f' ({unit})' if unit else ''}")


def check_text(name: str, value: object) -> None:
    """`value` must be a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}={value!r} must be a non-empty string")
