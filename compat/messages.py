"""The message-text rule: an exception of the expected type whose message differs counts as a pass.

TransferQueue's tests check error messages in two shapes; on tq_loader the harness treats both so:

1. ``with pytest.raises(T, match=PATTERN)``: :func:`tolerant_raises` checks the type as pytest
   does, and when only the message fails to match it records the difference and lets the test go on,
   so every later assertion of the test still runs.
2. ``with pytest.raises(T) as e`` followed by ``assert "text" in str(e.value)`` lines (or
   ``except T as e:`` then ``assert "text" in str(e)``): a failure on such a line (reached only if a
   T was caught), when nothing but such lines follows it in the test, is classified as a
   message-only difference (:func:`is_trailing_message_assert`): nothing else of the test was left unrun.

A wrong exception type, or no exception, fails as usual.
"""

from __future__ import annotations

import re
from types import TracebackType
from typing import Any

import pytest

_original_raises = pytest.raises
# Assertions on the text of a caught exception: ``assert "x" in str(exc_info.value)``, or
# ``assert "x" in str(e).lower() or "y" in str(e).lower()`` for ``e`` bound by ``except T as e``.
_ATOM = r"""(?:"[^"]*"|'[^']*')\s+in\s+str\(\s*\w+(?:\.value)?\s*\)(?:\.lower\(\))?"""
_MESSAGE_ASSERT = re.compile(rf"^\s*assert\s+\(?{_ATOM}(?:\s+(?:or|and)\s+{_ATOM})*\)?\s*(?:,.*)?$")
_STR_OF = re.compile(r"str\(\s*(\w+)(\.value)?\s*\)")
_EXCEPT_AS = r"^\s*except\b[^:]*\bas\s+{name}\s*:"

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


def is_trailing_message_assert(test_lines: list[str], index: int) -> bool:
    """True if ``test_lines[index]`` asserts a caught exception's text and only such lines follow it.

    The exception is ``NAME.value`` of a ``pytest.raises`` block, or ``NAME`` bound by an
    ``except T as NAME`` of the same test; reaching the line means the expected type was caught.
    """
    return _is_message_assert(test_lines, test_lines[index]) and all(
        not line.strip() or line.strip().startswith("#") or _is_message_assert(test_lines, line)
        for line in test_lines[index + 1 :]
    )


def _is_message_assert(test_lines: list[str], line: str) -> bool:
    if _MESSAGE_ASSERT.match(line) is None:
        return False
    return all(
        value or any(re.match(_EXCEPT_AS.format(name=re.escape(name)), other) for other in test_lines)
        for name, value in _STR_OF.findall(line)
    )


def install() -> None:
    pytest.raises = tolerant_raises  # type: ignore[assignment]
