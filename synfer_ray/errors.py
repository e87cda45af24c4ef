"""The one exception type of synfer-ray: every bad input names its field and the fix."""

from __future__ import annotations

from typing import Any


class SynferError(ValueError):
    """A bad input, found before any expensive work started.

    ``field`` is the config key, argument or file the user must change, ``value`` what they gave,
    and ``accepted`` what would have been taken instead.
    """

    def __init__(self, field: str, value: Any, accepted: str):
        self.field = field
        self.value = value
        self.accepted = accepted
        shown = repr(value)
        if len(shown) > 200:
            shown = shown[:197] + "..."
        super().__init__(f"{field}: got {shown}; expected {accepted}")
