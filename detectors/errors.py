"""The one error every decoder raises or records: `DecodeError(reason, detail)`.

Its own module so that the codecs (`compression`) and the event types (`base`) both use it
without importing each other.
"""

from __future__ import annotations


class DecodeError(ValueError):
    """A message that cannot be used. `reason` is a short stable key for counters."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class CollectsErrors:
    """For decoders that turn one input into several events: a bad part is recorded instead
    of discarding the good events decoded before it. `decode` raises the first error only
    when nothing else came out; receivers count the rest with `drain_errors()`."""

    def _init_errors(self) -> None:
        self._errors: list[DecodeError] = []

    def drain_errors(self) -> list[DecodeError]:
        errors, self._errors = self._errors, []
        return errors

    def _finish(self, events: list) -> list:
        if self._errors and not events:
            first = self._errors.pop(0)
            raise first
        return events
