"""The message-text rule: an exception of the expected type whose message differs counts as a pass.

TransferQueue's tests check error messages in two shapes; on tq_loader the harness treats both so:

1. ``with pytest.raises(T, match=PATTERN)``: :func:`tolerant_raises` checks the type as pytest
   does, and when only the message fails to match it records the difference and lets the test go on,
   so every later assertion of the test still runs.
2. ``with pytest.raises(T) as e`` followed by ``assert "text" in str(e.value)`` lines: a failure on
   such a line (reached only if the block caught a T), when nothing but such lines follows it in
   the test, is classified as a message-only difference (:func:`is_trailing_message_assert`):
   nothing else of the test was left unrun.

A wrong exception type, or no exception, fails as usual.
"""

from __future__ import annotations

import re
from types import TracebackType
from typing import Any

import pytest

_original_raises = pytest.raises
# Assertions on the text of a caught exception: ``assert "x" in str(exc_info.value)``.
_MESSAGE_ASSERT = re.compile(r"^\s*assert\s+.+\s+in\s+str\(\s*\w+\.value\s*\)\s*(,.*)?$")

recorded: list[dict[str, str]] = []  # message differences of the running test


def reset() -> None:
    recorded.clear()


class _TypeOnlyRaises:
    """``pytest.raises(T, match=...)`` that records, instead of failing on, a differing message."""

    def __init__(self, inner: Any, match: str | re.Pattern[str]) -> None:
        self.inner = inner
        self.match = match

    def __enter__(self) -> Any:
        return self.inner.__enter__()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        __tracebackhide__ = True
        suppressed = self.inner.__exit__(exc_type, exc, tb)  # fails on no exception; False on a wrong type
        if suppressed and not re.search(self.match, str(exc)):
            pattern = self.match if isinstance(self.match, str) else self.match.pattern
            recorded.append(
                {"type": type(exc).__name__, "expected_match": pattern, "message": str(exc)[:500]}
            )
        return bool(suppressed)


def tolerant_raises(expected_exception: Any, *args: Any, match: Any = None, **kwargs: Any) -> Any:
    """Drop-in for ``pytest.raises`` that applies the message-text rule to the context-manager form."""
    if match is None:
        return _original_raises(expected_exception, *args, **kwargs)
    if args:  # the callable form: nothing is left to run after a failing match
        return _original_raises(expected_exception, *args, match=match, **kwargs)
    return _TypeOnlyRaises(_original_raises(expected_exception, **kwargs), match)


def is_trailing_message_assert(failing_line: str, rest_of_test: list[str]) -> bool:
    """True if the failing line asserts an exception's text and only such lines (or none) follow it."""
    if not _MESSAGE_ASSERT.match(failing_line):
        return False
    for line in rest_of_test:
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not _MESSAGE_ASSERT.match(line):
            return False
    return True


def install() -> None:
    pytest.raises = tolerant_raises  # type: ignore[assignment]
