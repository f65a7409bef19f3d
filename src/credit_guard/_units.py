"""Units: how many of a feature's price one request takes (seconds of video, images...).

A route's ``units`` multiply the price, rounded up to whole credits. They arrive from
clients and handlers as ints, floats, Decimals or text, so they are bounded in size and
precision before any arithmetic is done with them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

#: Units a single request may reserve: beyond it, a typo or an attack.
MAX_UNITS = 1_000_000
#: How a route computes its units from the framework's request (sync or async).
UnitsOf = Callable[[Any], "int | float | Decimal | str | Awaitable[int | float | Decimal | str]"]

#: One unit, the default: compared by identity so the common case skips the Decimal maths.
ONE = Decimal(1)


#: Digits after the point a unit count keeps (a billionth of a second of video is plenty).
UNITS_PLACES = 9
#: The longest text a unit count may be written in; checked before it is parsed.
UNITS_TEXT_MAX = 40
_UNITS_STEP = Decimal(1).scaleb(-UNITS_PLACES)


def units_value(value: object, *, allow_zero: bool = False) -> Decimal:
    """A request's units as an exact Decimal, or ValueError saying why not.

    Decimal, not float: ``0.1 * 20`` must cost 2 credits, not 3. The size and precision
    are bounded BEFORE any arithmetic: ``Decimal("1e-10000000")`` parses at once, but
    turning it into an exact fraction (as pricing does) takes seconds of CPU, which a
    request must never be able to buy. ``allow_zero``: usage may be none at all.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise ValueError(f"units must be a number, got {type(value).__name__}")
    if isinstance(value, int) and not 0 <= value <= MAX_UNITS:  # an int is exact; its str() of a huge one is not cheap
        raise ValueError(
            f"units must be a number in range, from 0 to {MAX_UNITS}, got {'a larger int' if value > 0 else value}"
        )
    if isinstance(value, str) and len(value) > UNITS_TEXT_MAX:
        raise ValueError(f"units must be a number of at most {UNITS_TEXT_MAX} characters, got {value!r:.40}...")
    text = str(value).strip()  # a Decimal of a million digits is refused by its length, like text
    if len(text) > UNITS_TEXT_MAX:
        raise ValueError(f"units must be a number of at most {UNITS_TEXT_MAX} digits, got {text:.40}...")
    try:
        if "_" in text:  # Decimal reads "1_0" as 10: a typo must not cost ten units
            raise InvalidOperation
        units = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"units must be a number, got {value!r:.40}") from None
    exponent = units.as_tuple().exponent
    span = f"from 0 to {MAX_UNITS}" if allow_zero else f"above 0 and at most {MAX_UNITS}"
    if not units.is_finite() or not isinstance(exponent, int) or units.adjusted() > 6 or units < 0 or units > MAX_UNITS:
        raise ValueError(f"units must be a number {span}, got {value!r:.40}")
    if exponent < -UNITS_PLACES:
        # Beyond a billionth of a unit: a float's is noise (0.1 + 0.2), rounded to the nearest;
        # written digits are rounded up, so a fraction asked for is still paid for.
        rounding = ROUND_HALF_EVEN if isinstance(value, float) else ROUND_CEILING
        units = units.quantize(_UNITS_STEP, rounding=rounding).normalize()
    if units == 0 and not allow_zero:
        raise ValueError(f"units must be a number {span}, got {value!r:.40}")
    return units


def cost_of(unit_price: int, units: Decimal) -> int:
    """Credits for ``units`` at ``unit_price``, rounded up: a fraction of a unit is paid for."""
    numerator, denominator = units.as_integer_ratio()  # exact: no 28-digit rounding
    return -(-unit_price * numerator // denominator)
