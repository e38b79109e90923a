"""Objectives that are caller-supplied code: torch.export archives and cloudpickled callables.

Both formats unpickle when loaded (``torch.export.load`` reads pickled parts of its
archive), and a crafted pickle runs arbitrary code. So both loaders refuse with
:class:`UntrustedCodeError` before touching the bytes unless the caller is trusted, and
the service only passes ``trusted=True`` for callers it was configured to trust.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from torch import Tensor

from ._errors import ObjectiveError, UntrustedCodeError

__all__ = ["load_cloudpickle", "load_torch_export"]


def _require_trust(trusted: object, what: str) -> None:
    # `is True`, not truthiness: a stray non-empty string or object must not unlock code.
    if trusted is not True:
        raise UntrustedCodeError(
            f"loading a {what} runs code from the caller; it is allowed only for trusted "
            "callers on a server started to allow it"
        )


def load_torch_export(blob: bytes, *, trusted: bool = False) -> Callable[[Tensor], Tensor]:
    """The module of a ``torch.export.save``-d program, as ``fun(x)``.

    Raises UntrustedCodeError unless ``trusted`` is True, before reading ``blob``; raises
    ObjectiveError (field ``objective.blob``) for bytes that are not an exported program.
    Cost: deserialising the archive (proportional to its size, plus its constants).
    """
    _require_trust(trusted, "torch.export program")
    import torch.export

    try:
        program = torch.export.load(io.BytesIO(bytes(blob)))
        return program.module()
    except Exception as exc:  # any failure of a foreign archive is the caller's problem
        raise ObjectiveError(
            f"not a loadable torch.export program ({type(exc).__name__}: {exc}); save it "
            "with torch.export.save(torch.export.export(module, (x,), dynamic_shapes=...), "
            "buffer)",
            field="objective.blob",
        ) from exc


def load_cloudpickle(blob: bytes, *, trusted: bool = False) -> Callable[[Tensor], Tensor]:
    """A ``cloudpickle.dumps``-ed callable ``fun(x) -> scalar tensor``.

    Raises UntrustedCodeError unless ``trusted`` is True, before reading ``blob``.
    """
    _require_trust(trusted, "pickled callable")
    try:
        import cloudpickle
    except ImportError as exc:  # an optional dependency: secant-server[trust]
        raise ObjectiveError(
            "this server cannot load pickled callables: cloudpickle is not installed",
            field="objective.kind",
        ) from exc
    try:
        function = cloudpickle.loads(bytes(blob))
    except Exception as exc:
        raise ObjectiveError(
            f"not a loadable cloudpickle payload ({type(exc).__name__}: {exc})",
            field="objective.blob",
        ) from exc
    if not callable(function):
        raise ObjectiveError(
            f"the pickled object is a {type(function).__name__}, not a callable",
            field="objective.blob",
        )
    return function
