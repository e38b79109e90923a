"""Training data the workers load themselves: scikit-learn's bundled sets by name, and files
under an operator-chosen data root (`data_uri`), so large sets never travel through gRPC.

    X, y = load_dataset("digits")
    path = resolve_data_uri("file:///data/train.npz", root="/data")   # or "train.npz"
    info = inspect_data_file(path)       # names, shapes, dtypes from the header: cheap
    X, y = load_data_file(path)          # the tensors (float32 features, int64 labels)

Data files are safe formats only, never a pickle: `.safetensors` holding exactly the tensors
`X` and `y`, or `.npz` holding exactly the arrays `X` and `y` (read with allow_pickle=False).
`X` has one row per example (at least 2-D: (N, features), (N, C, H, W), (N, T) token ids),
`y` as many rows. Floating tensors load as float32, integer ones as int64; anything else
(bool, complex, object arrays) is refused naming the tensor.

A `data_uri` is a `file://` URI or a plain path (relative ones are under the root). It must
lie under the data root after `..` and symlinks are resolved (a root that is itself a symlink,
/data -> /mnt/vol, takes paths under either name); the gateway checks the form, the root and
the file's header before a job exists, and every worker resolves and checks it again when it
loads (it may run on another node that mounts the same root). The tensors a header declares
may take at most `MAX_DATA_FILE_BYTES` (2 GiB) in memory, counted at the larger of their
stored and their training dtype (float32 / int64): every data-parallel worker holds the whole
set. Errors are ValueError (bad form, missing file, a corrupt, encrypted or oddly compressed
file, wrong names, shapes or dtypes, too large) or PermissionError (data URIs are disabled: no
root; a path outside the root), with messages that start with the field.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import torch
from torch import Tensor

DATASETS = ("digits", "breast_cancer")
DATA_SUFFIXES = (".npz", ".safetensors")
DATA_NAMES = ("X", "y")
MAX_URI_CHARS = 4096
# The most memory a data file's tensors may take (see the module docstring); a gateway flag
# would set it per server, as --max-message-bytes bounds uploads.
MAX_DATA_FILE_BYTES = 2 * 2**30
# What a damaged, encrypted or unsupported file raises while it is read: zlib.error (a corrupt
# deflate stream), RuntimeError (an encrypted zip member), NotImplementedError (a compression
# method zipfile lacks), EOFError (a truncated stream), BadZipFile (a bad CRC or directory).
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    zlib.error,
    zipfile.BadZipFile,
    RuntimeError,
    NotImplementedError,
    RecursionError,
)
# The safetensors format caps its JSON header at 100 MB; a real two-tensor header is ~200 B.
_MAX_SAFETENSORS_HEADER = 1 << 20
_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}
_SAFETENSORS_DTYPES = {  # safetensors dtype -> (kind, itemsize): f float, i integer
    "F64": ("f", 8),
    "F32": ("f", 4),
    "F16": ("f", 2),
    "BF16": ("f", 2),
    "I64": ("i", 8),
    "I32": ("i", 4),
    "I16": ("i", 2),
    "I8": ("i", 1),
    "U64": ("i", 8),
    "U32": ("i", 4),
    "U16": ("i", 2),
    "U8": ("i", 1),
}


def load_dataset(name: str) -> tuple[Tensor, Tensor]:
    """(X float32, y) for a bundled dataset.

    digits: 1797 x 64 pixel intensities scaled to [0, 1], y int64 classes 0..9.
    breast_cancer: 569 x 30 features standardized (whole-set mean and std: the set is a
    fixed benchmark, not a deployment), y float32 0/1 for `bce`.
    """
    try:
        from sklearn import datasets
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise RuntimeError("bundled datasets need scikit-learn installed") from exc
    if name == "digits":
        bunch = datasets.load_digits()
        features = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
        return features, torch.tensor(bunch.target, dtype=torch.int64)
    if name == "breast_cancer":
        bunch = datasets.load_breast_cancer()
        features = torch.tensor(bunch.data, dtype=torch.float32)
        features = (features - features.mean(0)) / features.std(0)
        return features, torch.tensor(bunch.target, dtype=torch.float32)
    raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")


# ---------------------------------------------------------------- data files


class DataURIDisabled(PermissionError):
    """This server reads no data files (it was started without a data root)."""


class OutsideDataRoot(PermissionError):
    """The data URI names a file outside the data root (directly, by `..` or by a symlink)."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # as the file names it: "F32", "I64" (safetensors) or "float32", "int64" (npz)
    kind: str  # "f" floating, "i" integer


@dataclass(frozen=True)
class DataFileInfo:
    """What a data file holds, read from its header (no tensor data is read)."""

    path: Path
    format: str  # "npz" | "safetensors"
    X: TensorInfo
    y: TensorInfo

    @property
    def rows(self) -> int:
        return self.X.shape[0]


def resolve_data_uri(uri: object, root: str | os.PathLike | None) -> Path:
    """The resolved path of a `data_uri` under `root`; checks the form and the root only
    (inspect_data_file checks the file). Raises DataURIDisabled when root is None,
    OutsideDataRoot for a path that escapes it, ValueError for a malformed URI."""
    if root is None:
        raise DataURIDisabled(
            "data_uri: this server reads data files only when started with --data-root DIR;"
            " send the tensors as data (X, y) or name a bundled dataset instead"
        )
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"data_uri: a file:// URI or a path, got {uri!r}")
    if len(uri) > MAX_URI_CHARS or "\x00" in uri:
        raise ValueError(
            f"data_uri: not a usable path (more than {MAX_URI_CHARS} characters or a NUL character)"
        )
    raw = _path_of(uri)
    if not raw.endswith(DATA_SUFFIXES):
        raise ValueError(
            f"data_uri: {uri!r}: the file must end in {' or '.join(DATA_SUFFIXES)}"
            " (safetensors or numpy .npz holding X and y)"
        )
    # The root as given (absolute, normalized) and as resolved: a symlinked root (/data ->
    # /mnt/vol) takes /data/x.npz and /mnt/vol/x.npz alike.
    given = Path(os.path.normpath(os.path.abspath(root)))
    base = Path(root).resolve()
    # Lexically first, so that '..' is refused without touching the file system outside.
    joined = Path(os.path.normpath(given / raw))
    if not (joined.is_relative_to(given) or joined.is_relative_to(base)):
        raise OutsideDataRoot(f"data_uri: {uri!r} is outside the data root")
    try:
        resolved = joined.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before 3.13)
        raise ValueError(f"data_uri: {uri!r} cannot be resolved ({exc})") from None
    if not resolved.is_relative_to(base):  # a symlink under the root pointing out of it
        raise OutsideDataRoot(f"data_uri: {uri!r} is outside the data root (a symlink leaves it)")
    return resolved


def _path_of(uri: str) -> str:
    """The path part of a file:// URI (percent-decoded), or the plain path itself."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    if parts.scheme.lower() != "file":
        raise ValueError(
            f"data_uri: only file:// URIs and plain paths are read, got a {parts.scheme!r} URI"
        )
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"data_uri: a file:// URI names no host (file:///path), got host {parts.netloc!r}"
        )
    if parts.query or parts.fragment:
        raise ValueError("data_uri: a file:// URI takes no query or fragment")
    path = unquote(parts.path)
    if "\x00" in path:
        raise ValueError("data_uri: not a usable path (a NUL character)")
    return path


def inspect_data_file(
    path: str | os.PathLike, *, max_bytes: int | None = MAX_DATA_FILE_BYTES
) -> DataFileInfo:
    """The names, shapes and dtypes of a data file's tensors, from its header; ValueError
    naming the problem (missing file, not the format its suffix says, a corrupt, encrypted or
    unsupported member, wrong tensor names, unsupported dtypes, shapes that do not make a
    training set, tensors over `max_bytes` in memory; None: no cap)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ValueError(f"data_uri: no such file {path.name!r} under the data root")
        if path.suffix == ".npz":
            tensors, fmt = _npz_header(path, max_bytes), "npz"
        elif path.suffix == ".safetensors":
            tensors, fmt = _safetensors_header(path, max_bytes), "safetensors"
        else:
            raise ValueError(f"data_uri: the file must end in {' or '.join(DATA_SUFFIXES)}")
    except OSError as exc:  # unreadable, a name too long, ...: the caller's path, not a bug
        raise ValueError(f"data_uri: cannot read {path.name!r}: {exc.strerror or exc}") from None
    X, y = tensors["X"], tensors["y"]
    if len(X.shape) < 2:
        raise ValueError(
            f"data_uri: X must have one row per example and at least 2 dimensions"
            f" ((N, features), (N, C, H, W), (N, T) tokens), got shape"
            f" {list(X.shape)}"
        )
    if len(y.shape) < 1:
        raise ValueError("data_uri: y must have one row per example, got a scalar")
    if X.shape[0] != y.shape[0]:
        raise ValueError(
            f"data_uri: X and y must have as many rows, got {X.shape[0]} and {y.shape[0]}"
        )
    if X.shape[0] == 0:
        raise ValueError("data_uri: the file holds no examples (X has 0 rows)")
    return DataFileInfo(path=path, format=fmt, X=X, y=y)


def _check_names(names: list[str], path: Path) -> None:
    if sorted(names) != sorted(DATA_NAMES):
        raise ValueError(
            f"data_uri: {path.name!r} holds tensors {sorted(names)}; a training set"
            f" holds exactly 'X' and 'y'"
        )


def _memory_bytes(info: TensorInfo, itemsize: int) -> int:
    """The bytes a tensor takes in memory: at the larger of its stored and training dtype."""
    return math.prod(info.shape) * max(itemsize, 4 if info.kind == "f" else 8)


def _check_size(
    tensors: dict[str, TensorInfo], itemsizes: dict[str, int], path: Path, max_bytes: int | None
) -> None:
    if max_bytes is None:
        return
    total = sum(_memory_bytes(tensors[name], itemsizes[name]) for name in DATA_NAMES)
    if total > max_bytes:
        declared = ", ".join(
            f"{name} {list(tensors[name].shape)} {tensors[name].dtype}" for name in DATA_NAMES
        )
        raise ValueError(
            f"data_uri: {path.name!r} declares {_bytes_text(total)} of tensors ({declared}),"
            f" over this server's cap of {_bytes_text(max_bytes)} per data file"
        )


def _bytes_text(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.4g} {unit} ({count} bytes)"
    return f"{count} bytes"


def _safetensors_header(path: Path, max_bytes: int | None = None) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ValueError(f"data_uri: {path.name!r} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(
                f"data_uri: {path.name!r} is not a safetensors file (header length {length})"
            )
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"data_uri: {path.name!r} is not a safetensors file (header: {exc})"
            ) from None
        except RecursionError:  # '[[[[...': nested deeper than the parser's recursion
            raise ValueError(
                f"data_uri: {path.name!r} is not a safetensors file (its header is nested"
                " too deeply)"
            ) from None
    if not isinstance(header, dict):
        raise ValueError(f"data_uri: {path.name!r} is not a safetensors file")
    header.pop("__metadata__", None)
    _check_names(list(header), path)
    payload = size - 8 - length
    tensors, offsets_of, itemsizes = {}, {}, {}
    for name in DATA_NAMES:
        entry = header[name]
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise ValueError(f"data_uri: {path.name!r}: tensor {name!r} has a malformed entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"data_uri: tensor {name!r} is {dtype}; training data is a"
                f" floating or integer type ({', '.join(_SAFETENSORS_DTYPES)})"
            )
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise ValueError(f"data_uri: {path.name!r}: tensor {name!r} has a malformed entry")
        kind, itemsizes[name] = _SAFETENSORS_DTYPES[dtype]
        tensors[name] = TensorInfo(tuple(shape), dtype, kind)
        offsets_of[name] = offsets
    _check_size(tensors, itemsizes, path, max_bytes)  # what the header declares, first
    for name in DATA_NAMES:
        begin, end = offsets_of[name]
        if (
            not 0 <= begin <= end <= payload
            or end - begin != math.prod(tensors[name].shape) * itemsizes[name]
        ):
            raise ValueError(
                f"data_uri: {path.name!r}: tensor {name!r} does not fit the file"
                " (truncated or corrupt)"
            )
    return tensors


def _npz_header(path: Path, max_bytes: int | None = None) -> dict[str, TensorInfo]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"data_uri: {path.name!r} is not an .npz file ({exc})") from None
    with archive:
        members = archive.namelist()
        names = [m[:-4] if m.endswith(".npy") else m for m in members]
        _check_names(names, path)
        tensors, itemsizes = {}, {}
        for name in DATA_NAMES:
            try:
                with archive.open(f"{name}.npy") as member:
                    version = np.lib.format.read_magic(member)
                    if version not in _NPY_HEADERS:
                        raise ValueError(f"npy format version {version} is not read here")
                    shape, _, dtype = _NPY_HEADERS[version](member)
            except _READ_ERRORS as exc:
                raise ValueError(
                    f"data_uri: {path.name!r}: {name!r} is not a readable numpy array"
                    f" ({_read_error_text(exc)})"
                ) from None
            if any(d < 0 for d in shape):
                raise ValueError(f"data_uri: array {name!r} has a negative dimension {shape}")
            if dtype.hasobject:
                raise ValueError(
                    f"data_uri: array {name!r} holds Python objects, which load"
                    " only by unpickling; store numbers"
                )
            if dtype.kind not in "fiu":
                raise ValueError(
                    f"data_uri: array {name!r} is {dtype}; training data is a"
                    " floating or integer type"
                )
            tensors[name] = TensorInfo(
                tuple(int(d) for d in shape), dtype.name, "f" if dtype.kind == "f" else "i"
            )
            itemsizes[name] = dtype.itemsize
    _check_size(tensors, itemsizes, path, max_bytes)
    return tensors


def _read_error_text(exc: BaseException) -> str:
    """What went wrong reading a file, for a message: the error's kind and text."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, zlib.error):
        return f"corrupt compressed data: {exc}"
    if isinstance(exc, NotImplementedError):
        return f"an unsupported compression method: {exc}"
    if isinstance(exc, RuntimeError) and "encrypted" in str(exc):
        return f"encrypted: {exc}"
    if isinstance(exc, KeyError):
        return f"no member {exc}"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)


def load_data_file(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """(X, y) of a data file: floating tensors as float32, integer ones as int64. Checks the
    header first (inspect_data_file), so a bad file fails before its data is read; npz arrays
    are read with allow_pickle=False. Cost: the file's tensors in memory (plus one converted
    copy when the stored dtype differs)."""
    info = inspect_data_file(path)
    from safetensors import SafetensorError

    try:
        if info.format == "npz":
            with np.load(info.path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in DATA_NAMES}
            tensors = {
                name: torch.from_numpy(np.ascontiguousarray(array))
                for name, array in arrays.items()
            }
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(info.path))
    except (*_READ_ERRORS, SafetensorError) as exc:
        raise ValueError(
            f"data_uri: cannot read the tensors of {info.path.name!r} ({_read_error_text(exc)})"
        ) from None
    return _training_dtype(tensors["X"]), _training_dtype(tensors["y"])


def _training_dtype(tensor: Tensor) -> Tensor:
    return tensor.to(torch.float32) if tensor.is_floating_point() else tensor.to(torch.int64)


def open_data_uri(uri: str, root: str | os.PathLike | None) -> tuple[Tensor, Tensor]:
    """resolve_data_uri + load_data_file: what a worker does with a job's data_uri."""
    return load_data_file(resolve_data_uri(uri, root))


__all__ = [
    "DATASETS",
    "DATA_SUFFIXES",
    "MAX_DATA_FILE_BYTES",
    "DataFileInfo",
    "DataURIDisabled",
    "OutsideDataRoot",
    "TensorInfo",
    "inspect_data_file",
    "load_data_file",
    "load_dataset",
    "open_data_uri",
    "resolve_data_uri",
]
