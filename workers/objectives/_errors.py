"""The error types of the objective library.

Every problem with what a caller sent is an :class:`ObjectiveError` (a ``ValueError``) that
names the offending field, so the service can map it to INVALID_ARGUMENT in one place. Code
that would run caller-supplied Python (pickles, torch.export archives) without the caller
being trusted is refused with :class:`UntrustedCodeError` (a ``PermissionError``), which the
service maps to PERMISSION_DENIED.
"""

from __future__ import annotations


class ObjectiveError(ValueError):
    """An objective description that cannot be used, with the field it came from.

    ``field`` is a dotted wire-level path such as ``"objective.source"``, ``"data.A"`` or
    ``"x0"``; the message says what was expected and what came.
    """

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.args[0]}"


class ExpressionError(ObjectiveError):
    """An expression that cannot be parsed, compiled or evaluated on the probe point.

    ``column`` is the 0-based character offset of the offending part when known.
    """

    def __init__(
        self, message: str, *, field: str = "objective.source", column: int | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.column = column


class UntrustedCodeError(PermissionError):
    """Loading this objective would run caller-supplied code, and the caller is not trusted."""
