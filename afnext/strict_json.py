"""Strict JSON for input from outside: what every edge of the project parses client text with.

Python's `json.loads` takes `NaN`, `Infinity` and `-Infinity`, which JSON does not allow and which
turn into NaN options (a NaN penalty repeats one token for ever) or crash handlers further in; and
it turns a 100,000-digit integer into a number at quadratic cost. Callers catch ValueError (bad
JSON, bad UTF-8, these refusals) and RecursionError (arrays nested thousands deep) and answer in
their own protocol's words.
"""

from __future__ import annotations

import json


def loads(data: str | bytes, *, max_digits: int | None = None) -> object:
    """`json.loads` refusing NaN/Infinity, and integers longer than `max_digits` when given."""
    return json.loads(data, parse_constant=_refuse_constant,
                      parse_int=None if max_digits is None else _bounded_int(max_digits))


def _refuse_constant(name: str):
    raise ValueError(f"The input contains {name}, which JSON does not allow; send a finite number.")


def _bounded_int(max_digits: int):
    def parse(digits: str) -> int:
        length = len(digits.lstrip("-"))
        if length > max_digits:
            raise ValueError(f"The input has a number with {length:,} digits; the limit is {max_digits}.")
        return int(digits)

    return parse
