"""tq_loader: a streaming data plane for LLM post-training (TransferQueue-compatible)."""

from tq_loader.errors import (
    CapacityError,
    ClosedError,
    DataLostError,
    NotFoundError,
    ProtocolError,
    SchemaError,
    TQConnectionError,
    TQError,
    TQTimeoutError,
)

__version__ = "0.1.0"
