"""Numbers as users write them in configs: 0.03, 3e-2 or "8/255"."""

import re
from typing import Annotated

from pydantic import BeforeValidator

_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


def parse_number(value):
    """Turn "a/b" into a float; leave anything else to pydantic's float parsing."""
    if isinstance(value, str):
        match = _FRACTION.match(value)
        if match:
            numerator, denominator = (float(g) for g in match.groups())
            if denominator == 0:
                raise ValueError(f"'{value}' divides by zero")
            return numerator / denominator
    return value


Number = Annotated[float, BeforeValidator(parse_number)]
"""A float that also accepts a fraction written as a string, e.g. eps: "8/255"."""
