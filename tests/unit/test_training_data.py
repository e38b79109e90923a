"""Training inputs beyond the zoo and uploads: data files under a data root (datasets.py) and
a trusted caller's own module (models.py: pickle, torch_export), loaded only when trusted."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from secant import SecantError
from secant._training import model_spec
from workers.objectives import UntrustedCodeError
from workers.training.datasets import (
    MAX_DATA_FILE_BYTES,
    DataURIDisabled,
    OutsideDataRoot,
    inspect_data_file,
    load_data_file,
    open_data_uri,
    resolve_data_uri,
)
from workers.training.loop import TrainSpec, evaluate, split, train
from workers.training.models import build_model, parse_model_spec


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _data(rows: int = 60):
    generator = np.random.default_rng(0)
    X = generator.normal(size=(rows, 6))
    y = (X[:, 0] > 0).astype(np.int32) + (X[:, 1] > 0).astype(np.int32)
    return X, y


@pytest.fixture
def root(tmp_path):
    directory = tmp_path / "data"
    directory.mkdir()
    return directory


# ---------------------------------------------------------------- data files


def test_npz_loads_as_float32_features_and_int64_labels(root):
    X, y = _data()
    np.savez(root / "set.npz", X=X, y=y)

    X_t, y_t = open_data_uri("set.npz", root)

    assert X_t.dtype == torch.float32 and y_t.dtype == torch.int64
    np.testing.assert_allclose(X_t.numpy(), X.astype(np.float32))
    np.testing.assert_array_equal(y_t.numpy(), y)


def test_safetensors_file_uri_loads_the_same_tensors(root):
    X, y = _data()
    save_file(
        {"X": torch.tensor(X, dtype=torch.bfloat16), "y": torch.tensor(y)},
        str(root / "set.safetensors"),
    )

    X_t, y_t = open_data_uri(f"file://{root}/set.safetensors", root)

    assert X_t.dtype == torch.float32 and y_t.dtype == torch.int64
    assert X_t.shape == (60, 6)
    np.testing.assert_array_equal(y_t.numpy(), y)


def test_compressed_npz_and_an_absolute_path_under_the_root_load(root):
    X, y = _data()
    np.savez_compressed(root / "packed.npz", X=X, y=y.astype(np.float64))
    info = inspect_data_file(resolve_data_uri(str(root / "packed.npz"), root))
    assert (info.format, info.rows, info.X.shape, info.y.kind) == ("npz", 60, (60, 6), "f")
    _, y_t = load_data_file(info.path)
    assert y_t.dtype == torch.float32


def test_data_uris_are_refused_without_a_data_root(root):
    with pytest.raises(DataURIDisabled, match="--data-root"):
        resolve_data_uri("set.npz", None)
    assert issubclass(DataURIDisabled, PermissionError)


@pytest.mark.parametrize(
    "uri",
    [
        "../outside.npz",
        "sub/../../outside.npz",
        "/etc/outside.npz",
        "file:///etc/outside.npz",
        "file:///%2E%2E/outside.npz",
    ],
)
def test_paths_escaping_the_root_are_refused(root, uri):
    with pytest.raises(OutsideDataRoot, match="outside the data root"):
        resolve_data_uri(uri, root)


def test_a_symlink_out_of_the_root_is_refused(root, tmp_path):
    X, y = _data()
    np.savez(tmp_path / "secret.npz", X=X, y=y)
    os.symlink(tmp_path / "secret.npz", root / "link.npz")
    with pytest.raises(OutsideDataRoot, match="symlink"):
        resolve_data_uri("link.npz", root)


@pytest.mark.parametrize(
    "uri, message",
    [
        ("s3://bucket/set.npz", "only file:// URIs"),
        ("file://otherhost/set.npz", "names no host"),
        ("set.csv", ".npz or .safetensors"),
        ("set.pt", ".npz or .safetensors"),
        ("", "a file:// URI or a path"),
    ],
)
def test_malformed_uris_name_the_problem(root, uri, message):
    with pytest.raises(ValueError, match=message):
        resolve_data_uri(uri, root)


def test_a_missing_file_is_a_clear_value_error(root):
    with pytest.raises(ValueError, match="no such file 'absent.npz'"):
        inspect_data_file(resolve_data_uri("absent.npz", root))


def test_wrong_tensor_names_are_named(root):
    X, y = _data()
    np.savez(root / "named.npz", features=X, labels=y)
    save_file(
        {"X": torch.tensor(X), "y": torch.tensor(y), "w": torch.ones(2)},
        str(root / "extra.safetensors"),
    )
    with pytest.raises(ValueError, match=r"holds tensors \['features', 'labels'\]"):
        inspect_data_file(root / "named.npz")
    with pytest.raises(ValueError, match=r"holds tensors \['X', 'w', 'y'\]"):
        inspect_data_file(root / "extra.safetensors")


def test_object_arrays_are_refused_without_unpickling(root):
    objects = np.empty(60, dtype=object)
    np.savez(root / "objects.npz", X=np.zeros((60, 2)), y=objects)  # np.savez pickles these
    with pytest.raises(ValueError, match="Python objects"):
        load_data_file(root / "objects.npz")


def test_bad_dtypes_and_shapes_are_named(root):
    np.savez(root / "bools.npz", X=np.zeros((4, 2)), y=np.zeros(4, dtype=bool))
    np.savez(root / "rows.npz", X=np.zeros((4, 2)), y=np.zeros(5))
    np.savez(root / "flat.npz", X=np.zeros(4), y=np.zeros(4))
    save_file(
        {"X": torch.zeros(4, 2), "y": torch.zeros(4, dtype=torch.bool)},
        str(root / "bools.safetensors"),
    )
    with pytest.raises(ValueError, match="array 'y' is bool"):
        inspect_data_file(root / "bools.npz")
    with pytest.raises(ValueError, match="as many rows, got 4 and 5"):
        inspect_data_file(root / "rows.npz")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        inspect_data_file(root / "flat.npz")
    with pytest.raises(ValueError, match="tensor 'y' is BOOL"):
        inspect_data_file(root / "bools.safetensors")


def test_files_that_are_not_their_format_are_refused(root):
    save_file({"X": torch.zeros(40, 2), "y": torch.zeros(40)}, str(root / "whole.safetensors"))
    whole = (root / "whole.safetensors").read_bytes()
    (root / "cut.safetensors").write_bytes(whole[:-16])
    (root / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        inspect_data_file(root / "cut.safetensors")
    with pytest.raises(ValueError, match="not an .npz file"):
        inspect_data_file(root / "junk.npz")


# ---------------------------------------------------------------- damaged, odd and huge files


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_header_only(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy member whose header declares `shape` and which holds no data at all."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


def _zip(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _patch_zip_headers(path, *, flag_bits: int = 0, method: int | None = None) -> None:
    """Sets general-purpose flag bits and / or the compression method in every local and
    central directory header (zipfile writes neither encryption nor unknown methods)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        local = [info.header_offset for info in archive.infolist()]
    central = [i for i in range(len(data) - 4) if data[i : i + 4] == b"PK\x01\x02"]
    for offsets, flag_at, method_at in ((local, 6, 8), (central, 8, 10)):
        for offset in offsets:
            flags = int.from_bytes(data[offset + flag_at : offset + flag_at + 2], "little")
            data[offset + flag_at : offset + flag_at + 2] = (flags | flag_bits).to_bytes(
                2, "little"
            )
            if method is not None:
                data[offset + method_at : offset + method_at + 2] = method.to_bytes(2, "little")
    path.write_bytes(bytes(data))


def _member_data_offset(path, name: str) -> int:
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        offset = archive.getinfo(name).header_offset
    names, extra = struct.unpack("<HH", data[offset + 26 : offset + 30])
    return offset + 30 + names + extra


def _corrupt(path, at: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] = value
    path.write_bytes(bytes(data))


def _safetensors_with_header(path, header: bytes, payload: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)


def test_a_deeply_nested_safetensors_header_is_a_value_error(root):
    _safetensors_with_header(root / "deep.safetensors", b"[" * 200_000)
    with pytest.raises(ValueError, match=r"data_uri: 'deep.safetensors' .*nested too deeply"):
        inspect_data_file(resolve_data_uri("deep.safetensors", root))


def test_a_corrupt_deflate_member_is_a_value_error(root):
    X, y = _data()
    path = root / "corrupt.npz"
    np.savez_compressed(path, X=X, y=y)
    # a deflate block header of type 3 (reserved): the first bytes of X.npy do not inflate
    _corrupt(path, _member_data_offset(path, "X.npy"), 0xFF)
    with pytest.raises(ValueError, match=r"data_uri: 'corrupt.npz': 'X' .*corrupt compressed data"):
        inspect_data_file(path)


def test_a_corrupt_deflate_stream_after_the_header_fails_the_load_as_a_value_error(root):
    generator = np.random.default_rng(3)
    path = root / "late.npz"
    np.savez_compressed(path, X=generator.normal(size=(4000, 6)), y=np.zeros(4000, np.int64))
    with zipfile.ZipFile(path) as archive:
        size = archive.getinfo("X.npy").compress_size
    start = _member_data_offset(path, "X.npy")
    _corrupt(path, start + size // 2, path.read_bytes()[start + size // 2] ^ 0xFF)
    assert inspect_data_file(path).X.shape == (4000, 6)  # the header still inflates
    with pytest.raises(ValueError, match=r"data_uri: cannot read the tensors of 'late.npz'"):
        load_data_file(path)


def test_an_encrypted_npz_member_is_a_value_error(root):
    X, y = _data()
    path = root / "locked.npz"
    _zip(path, {"X.npy": _npy(X), "y.npy": _npy(y)})
    _patch_zip_headers(path, flag_bits=0x1)
    with pytest.raises(ValueError, match=r"data_uri: 'locked.npz': 'X' .*encrypted"):
        inspect_data_file(path)


def test_an_unsupported_compression_method_is_a_value_error(root):
    X, y = _data()
    path = root / "aes.npz"
    _zip(path, {"X.npy": _npy(X), "y.npy": _npy(y)})
    _patch_zip_headers(path, method=99)  # WinZip AES: zipfile cannot read it
    with pytest.raises(ValueError, match=r"data_uri: 'aes.npz': 'X' .*unsupported compression"):
        inspect_data_file(path)


def test_an_npz_header_declaring_more_than_the_cap_is_refused_before_any_data_is_read(root):
    path = root / "huge.npz"
    _zip(
        path,
        {
            "X.npy": _npy_header_only((1_000_000, 1000)),
            "y.npy": _npy_header_only((1_000_000,), "<i4"),
        },
    )
    assert path.stat().st_size < 2000
    with pytest.raises(ValueError) as err:
        inspect_data_file(path)
    message = str(err.value)
    # X: 4e9 bytes as float32; y: int32 held as int64, 8e6 bytes
    assert message.startswith("data_uri: 'huge.npz' declares 3.733 GiB")
    assert "4008000000 bytes" in message and "cap of 2 GiB" in message
    assert f"{MAX_DATA_FILE_BYTES} bytes" in message
    # the cap is a parameter; under it, the header passes (its data is never read here)
    assert inspect_data_file(path, max_bytes=None).X.shape == (1_000_000, 1000)


def test_a_safetensors_header_declaring_more_than_the_cap_is_refused(root):
    rows = 3 * 2**28  # 3 GiB of float32 features; uint8 labels, 6 GiB once int64
    header = json.dumps(
        {
            "X": {"dtype": "F32", "shape": [rows, 1], "data_offsets": [0, rows * 4]},
            "y": {"dtype": "U8", "shape": [rows], "data_offsets": [rows * 4, rows * 5]},
        }
    ).encode()
    _safetensors_with_header(root / "huge.safetensors", header)
    with pytest.raises(
        ValueError,
        match=r"data_uri: 'huge.safetensors' declares 9 GiB .*"
        r"X \[805306368, 1\] F32.* over this server's cap of 2 GiB",
    ):
        inspect_data_file(root / "huge.safetensors")
    # without a cap it is what it is: a header with no data behind it
    with pytest.raises(ValueError, match="truncated or corrupt"):
        inspect_data_file(root / "huge.safetensors", max_bytes=None)


def test_the_gateway_refuses_a_file_over_the_cap_before_a_job_exists(root):
    from google.protobuf import json_format, struct_pb2

    from secant.v1 import optimizer_pb2 as pb
    from service.training import validate_train_request
    from service.validation import Limits

    _zip(
        root / "huge.npz",
        {"X.npy": _npy_header_only((2**20, 2**10)), "y.npy": _npy_header_only((2**20,), "<i8")},
    )
    spec = json_format.ParseDict(
        {"model": {"kind": "mlp", "sizes": [1024, 10]}, "data_uri": "huge.npz"},
        struct_pb2.Struct(),
    )
    with pytest.raises(ValueError, match=r"^spec\.data_uri: 'huge.npz' declares 4.008 GiB"):
        validate_train_request(pb.TrainRequest(spec=spec), Limits(), data_root=str(root))


def test_a_symlinked_data_root_takes_paths_under_either_name(tmp_path):
    volume = tmp_path / "mnt" / "vol"
    (volume / "sub").mkdir(parents=True)
    link = tmp_path / "data"
    os.symlink(volume, link)
    X, y = _data()
    np.savez(volume / "sub" / "train.npz", X=X, y=y)
    np.savez(tmp_path / "outside.npz", X=X, y=y)
    os.symlink(tmp_path / "outside.npz", volume / "escape.npz")
    target = (volume / "sub" / "train.npz").resolve()

    for uri in (
        f"file://{link}/sub/train.npz",  # the root's own name: was refused
        f"{link}/sub/train.npz",
        "sub/train.npz",
        f"file://{volume}/sub/train.npz",  # the resolved name
        f"file://{link}/sub/../sub/train.npz",
    ):
        assert resolve_data_uri(uri, link) == target, uri
    # the escapes stay refused
    for uri in (f"file://{link}/../outside.npz", "../outside.npz", f"{tmp_path}/outside.npz"):
        with pytest.raises(OutsideDataRoot, match="outside the data root"):
            resolve_data_uri(uri, link)
    with pytest.raises(OutsideDataRoot, match="symlink"):
        resolve_data_uri(f"file://{link}/escape.npz", link)


def test_the_gateway_keeps_a_symlinked_root_by_its_name(tmp_path):
    from google.protobuf import json_format, struct_pb2

    from secant.v1 import optimizer_pb2 as pb
    from service.training import TrainingJobs, validate_train_request
    from service.validation import Limits

    volume = tmp_path / "vol"
    volume.mkdir()
    link = tmp_path / "data"
    os.symlink(volume, link)
    X, y = _data()
    np.savez(volume / "train.npz", X=X, y=y)
    jobs = TrainingJobs(None, Limits(), tmp_path / "artifacts", data_root=str(link))
    spec = json_format.ParseDict(
        {"model": {"kind": "mlp", "sizes": [6, 3]}, "data_uri": f"file://{link}/train.npz"},
        struct_pb2.Struct(),
    )
    checked = validate_train_request(
        pb.TrainRequest(spec=spec), Limits(), data_root=jobs._data_root
    )
    assert checked.spec["data_uri"] == f"file://{link}/train.npz"


# ---------------------------------------------------------------- the caller's own module


def _exported(module: nn.Module, dynamic: bool = True) -> torch.export.ExportedProgram:
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic else None
    return torch.export.export(module, (torch.zeros(4, 6),), dynamic_shapes=shapes)


def test_code_models_are_refused_before_their_bytes_are_read():
    junk = {"kind": "pickle", "module": base64.b64encode(b"\x80\x04junk").decode()}
    for trusted in (False, "yes", 1):
        with pytest.raises(UntrustedCodeError, match="trusted callers"):
            build_model(junk, trusted=trusted)  # junk would be a ValueError once read
    with pytest.raises(ValueError, match="not a loadable torch.save"):
        build_model(junk, trusted=True)


def test_a_pickled_module_and_its_exported_program_train_alike():
    torch.manual_seed(0)
    module = SmallNet()
    X, y = (torch.tensor(a) for a in _data(120))
    X, y = X.float(), y.long()
    spec = {"optimizer": {"name": "adam", "lr": 0.05}, "steps": 15, "batch_size": 32, "seed": 1}

    pickled = train(dict(spec, model=model_spec(module)), X, y, trusted=True)
    exported = train(dict(spec, model=model_spec(_exported(module))), X, y, trusted=True)

    assert pickled.metrics["val_loss"] < pickled.history[0].loss
    assert exported.metrics == pytest.approx(pickled.metrics, rel=1e-5)
    fresh = SmallNet()
    fresh.load_state_dict(exported.model.state_dict())  # the original module's names
    _, _, X_val, y_val = split(X, y, 0.2, 1)
    assert evaluate(fresh, "cross_entropy", X_val, y_val)["loss"] == pytest.approx(
        exported.metrics["val_loss"], rel=1e-6
    )
    assert not torch.equal(fresh.body[0].weight, module.body[0].weight)  # it trained


def test_an_untrusted_train_never_builds_a_code_model():
    X, y = torch.zeros(10, 6), torch.zeros(10, dtype=torch.int64)
    with pytest.raises(UntrustedCodeError):
        train({"model": model_spec(SmallNet()), "steps": 1}, X, y)


def test_exported_programs_need_a_dynamic_batch_and_cannot_take_kfac():
    static = model_spec(_exported(SmallNet(), dynamic=False))
    with pytest.raises(ValueError, match="batch dimension was exported fixed at 4"):
        build_model(static, trusted=True)
    X, y = torch.zeros(10, 6), torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match="zero_stage 3"):
        TrainSpec.parse({"model": model_spec(_exported(SmallNet())), "scaling": {"zero_stage": 3}})
    with pytest.raises(ValueError, match="optimizer kfac needs nn.Linear"):
        train({"model": model_spec(_exported(SmallNet())), "optimizer": "kfac"}, X, y, trusted=True)


def test_bad_code_model_specs_name_the_field():
    with pytest.raises(ValueError, match="pickle.module is not valid base64"):
        parse_model_spec({"kind": "pickle", "module": "not base64!"})
    with pytest.raises(ValueError, match="torch_export.program is required"):
        parse_model_spec({"kind": "torch_export"})
    with pytest.raises(ValueError, match="unknown field"):
        parse_model_spec({"kind": "pickle", "module": "AAAA", "sizes": [1]})
    not_a_module = io.BytesIO()
    torch.save({"weight": torch.ones(2)}, not_a_module)
    with pytest.raises(ValueError, match="is a dict, not a torch.nn.Module"):
        build_model(
            {"kind": "pickle", "module": base64.b64encode(not_a_module.getvalue()).decode()},
            trusted=True,
        )


def test_the_sdk_turns_modules_and_programs_into_wire_specs():
    assert model_spec({"kind": "mlp", "sizes": [2, 1]}) == {"kind": "mlp", "sizes": [2, 1]}
    assert model_spec(SmallNet())["kind"] == "pickle"
    assert model_spec(_exported(SmallNet()))["kind"] == "torch_export"
    with pytest.raises(SecantError, match="torch.nn.Module"):
        model_spec(lambda x: x)
