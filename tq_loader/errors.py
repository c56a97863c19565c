"""Typed errors of tq_loader.

Every error raised by the library derives from :class:`TQError`, so ``except tq.TQError`` catches
them all; each subclass also derives from the built-in exception a TransferQueue user would catch
(``ValueError``, ``KeyError``, ``TimeoutError``, ``ConnectionError``), so compat code keeps working::

    TQError
    ├── NotFoundError      unknown partition / key / field / sampler   (also KeyError, ValueError)
    │   └── CheckpointNotFoundError  no checkpoint at a path          (also FileNotFoundError)
    ├── SchemaError        dtype conflict, batch-size mismatch, unsupported type   (also ValueError)
    ├── ArgumentError      a call's argument has the wrong type or value, named   (also TypeError, ValueError)
    ├── CapacityError      a storage unit is full and stayed full until the timeout
    ├── TQTimeoutError     a request's deadline passed                  (also TimeoutError)
    ├── TQConnectionError  a service cannot be reached or died          (also ConnectionError)
    │   └── DataLostError  rows whose storage unit is gone: reported lost, never served
    ├── ClosedError        the partition was aborted, or the client/service is closed
    └── ProtocolError      malformed frames or messages on the wire     (also ValueError)

Errors cross the wire by name (see :func:`error_from_wire`): a server-side exception becomes an
error reply and the client re-raises the same type with the same message.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "CapacityError",
    "CheckpointNotFoundError",
    "ClosedError",
    "DataLostError",
    "NotFoundError",
    "ProtocolError",
    "ResumeStateError",
    "SchemaError",
    "TQConnectionError",
    "TQError",
    "TQTimeoutError",
    "TransferQueueConflictError",
    "error_from_wire",
    "error_to_wire",
]


class TQError(Exception):
    """Base of every tq_loader error."""


class NotFoundError(TQError, KeyError, ValueError):
    """An unknown partition, key, field or sampler was named."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable.
        return str(self.args[0]) if self.args else ""


class CheckpointNotFoundError(NotFoundError, FileNotFoundError):
    """No checkpoint at the given path (also a ``FileNotFoundError``, as TransferQueue raises)."""


class SchemaError(TQError, ValueError):
    """Data does not fit the column's schema, or has a type the codec refuses."""


class ArgumentError(TQError, TypeError, ValueError):
    """An argument of a public call has the wrong type or value; the message names it.

    Raised by the client before anything is sent, so a bad call fails at once instead of waiting
    for a server's answer.
    """


class ResumeStateError(ArgumentError):
    """A loader ``state_dict`` saved for another cluster, partition, task or rank layout."""


class CapacityError(TQError):
    """A storage unit is full; free rows (clear) or raise its capacity."""


class TQTimeoutError(TQError, TimeoutError):
    """A request did not complete before its deadline."""


class TQConnectionError(TQError, ConnectionError):
    """A service could not be reached or stopped answering."""


class DataLostError(TQConnectionError):
    """Rows whose storage unit died: they are lost and are never served."""


class ClosedError(TQError):
    """The partition was aborted by a producer, or the client/service was closed."""


class TransferQueueConflictError(TQError, ImportError):
    """A real TransferQueue is importable, so ``transfer_queue`` is not aliased to tq_loader."""


def transfer_queue_conflict(origin: str) -> TransferQueueConflictError:
    """The error for a real TransferQueue found at ``origin``: what was found and the ways out."""
    return TransferQueueConflictError(
        f"a real TransferQueue is importable here ({origin}); aliasing transfer_queue to tq_loader would "
        "shadow it. Uninstall it from this environment (pip uninstall TransferQueue) to run TransferQueue "
        "code on tq_loader, or unset TQ_LOADER_ALIAS_TRANSFER_QUEUE and do not call alias_transfer_queue() "
        "to keep using TransferQueue; code written for tq_loader imports it directly (import tq_loader as tq)."
    )


class ProtocolError(TQError, ValueError):
    """A frame or message on the wire is malformed."""


_BY_NAME: dict[str, type[TQError]] = {
    cls.__name__: cls
    for cls in (
        TQError,
        NotFoundError,
        CheckpointNotFoundError,
        SchemaError,
        ArgumentError,
        CapacityError,
        TQTimeoutError,
        TQConnectionError,
        DataLostError,
        ClosedError,
        ProtocolError,
    )
}


def error_to_wire(exc: BaseException) -> tuple[str, str]:
    """Name and message of ``exc`` for an error reply (unknown types travel as ``TQError``)."""
    kind = type(exc).__name__ if isinstance(exc, TQError) else _builtin_kind(exc)
    message = str(exc) if not isinstance(exc, KeyError) or isinstance(exc, TQError) else str(exc.args[0])
    return kind, message or type(exc).__name__


def _builtin_kind(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return "NotFoundError"
    if isinstance(exc, (ValueError, TypeError)):
        return "SchemaError"
    if isinstance(exc, TimeoutError):
        return "TQTimeoutError"
    return "TQError"


def error_from_wire(kind: str, message: str) -> TQError:
    """Rebuild the typed error named ``kind`` (an unknown name gives a plain :class:`TQError`)."""
    return _BY_NAME.get(kind, TQError)(message)
