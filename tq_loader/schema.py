"""Per-column schema: what a field holds, shared by metadata, codec, controller and storage.

A schema is decided by the column, never by the rows a reader happens to select: once a column
has seen two per-row shapes it is jagged for good (types never depend on the data).
"""

from __future__ import annotations

import msgspec

__all__ = ["FieldSchema", "OBJECT_DTYPE"]

OBJECT_DTYPE = "object"


class FieldSchema(msgspec.Struct, frozen=True, array_like=True):
    """Schema of one field (column).

    ``dtype`` is a torch dtype name without the ``torch.`` prefix (``"float32"``, ``"bfloat16"``)
    or ``"object"`` for non-tensor values. ``shape`` is the per-row shape; ``-1`` marks a dimension
    that varies between rows (jagged). ``is_nested``: rows differ in shape (returned as a jagged
    nested tensor when exactly one dimension varies). ``is_non_tensor``: str/bytes/numbers/dicts...
    """

    dtype: str
    shape: tuple[int, ...] = ()
    is_nested: bool = False
    is_non_tensor: bool = False

    def merge(self, other: FieldSchema) -> FieldSchema:
        """Schema after ``other`` is written into a column that has ``self``.

        Raises ``SchemaError`` on a dtype or tensor/non-tensor conflict; a different per-row shape
        (or rank) turns the column jagged, with ``-1`` where the sizes differ.
        """
        from tq_loader.errors import SchemaError

        if self == other:
            return self
        if self.is_non_tensor != other.is_non_tensor or self.dtype != other.dtype:
            raise SchemaError(
                f"dtype conflict: column holds {self.dtype!r}, write has {other.dtype!r}; "
                "write this field with the column's dtype or use a new field name"
            )
        if self.is_non_tensor:
            return self
        if len(self.shape) != len(other.shape):
            raise SchemaError(
                f"rank conflict: column rows have shape {self.shape}, write has {other.shape}; "
                "rows of one field must have the same number of dimensions"
            )
        shape = tuple(a if a == b else -1 for a, b in zip(self.shape, other.shape))
        nested = self.is_nested or other.is_nested or shape != self.shape
        return FieldSchema(self.dtype, shape, nested, False)
