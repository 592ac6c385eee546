"""runq's JSON is strict, for inputs as for outputs: what JSON cannot carry is refused.

Python's json module reads NaN and Infinity and strings holding a lone UTF-16 surrogate, and
pydantic writes NaN as null: such an input was quietly changed on its way to the model, and the
same values in an output could never be answered. A request body is searched for the bytes that
may spell them (a search as fast as memchr); only a body that has them is parsed strictly.
"""

from __future__ import annotations

import json
from typing import Any

from runq.errors import ValidationFailed

_NON_FINITE = (b"NaN", b"Infinity")
# A JSON escape of a surrogate: \uD800-\uDFFF, in either case. Pairs are fine; lone ones are not.
_SURROGATE_ESCAPES = (b"\\ud", b"\\uD")


def check_strict_json(body: bytes, *, allow_inf_nan: bool) -> None:
    """Raises ValidationFailed if the body holds NaN/Infinity (unless allowed) or a lone
    surrogate; the body has already been parsed leniently, so it is valid JSON otherwise."""
    suspect_numbers = not allow_inf_nan and any(token in body for token in _NON_FINITE)
    suspect_strings = any(escape in body for escape in _SURROGATE_ESCAPES)
    if not (suspect_numbers or suspect_strings):
        return
    value = json.loads(body, parse_constant=_non_finite if suspect_numbers else None)
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ValidationFailed(
            "the body holds a lone UTF-16 surrogate (such as \\ud800), which is not a character"
        ) from None


def _non_finite(token: str) -> Any:
    raise ValidationFailed(
        f"the body holds {token}, which JSON does not allow; a function that takes it declares "
        "the number with Field(allow_inf_nan=True)"
    )
