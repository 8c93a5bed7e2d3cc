"""The file writer: byte format readable by torch.load, values and storage sharing exactly as
torch.save would give them, and torch.save itself for what it cannot reproduce."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from aiockpt.storage import _fastsave, _zipwrite
from aiockpt.storage._load import load
from aiockpt.storage._local import save_file, verify_file

_DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.bool,
    torch.complex64,
    torch.int64,
    torch.float16,
    torch.uint8,
    torch.float64,
]


def _tensor(i: int) -> torch.Tensor:
    dtype = _DTYPES[i % len(_DTYPES)]
    values = torch.arange(i % 5 + 1, dtype=torch.float64) + i
    if dtype is torch.bool:
        return values.remainder(2).to(torch.bool)
    if dtype is torch.complex64:
        return torch.complex(values, -values).to(dtype)
    return values.to(dtype)


def many_tensors(n: int) -> dict[str, Any]:
    """A state of ``n`` tensors with everything torch.save keeps: tied weights, views
    with offsets and strides, parameters, mixed dtypes, empty tensors, nested containers
    and non-tensor values."""
    base = torch.randn(16, 16)
    param = torch.nn.Parameter(torch.randn(4, 4))
    frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    layers: dict[str, Any] = {}
    previous = base
    for i in range(n):
        if i % 10 == 3:
            t = previous[1:]  # a view with an offset into the previous tensor
        elif i % 13 == 0:
            t = torch.empty(0, i % 3, dtype=_DTYPES[i % len(_DTYPES)])
        else:
            t = _tensor(i)
        layers[f"layer.{i}"] = t
        previous = t if t.numel() > 1 else previous
    return {
        "model": {
            "embed.weight": base,
            "head.weight": base,  # tied
            "window": base[2:10, 3::2],  # offset and strides
            "transposed": base.t(),
            "param": param,
            "param_again": param,
            "param_data": param.detach(),
            "frozen": frozen,
            "grad": torch.ones(2, requires_grad=True),
            "layers": layers,
        },
        "optim": {"state": [{"step": torch.tensor(7.0), "buf": [torch.zeros(3), None]}]},
        "step": 1234,
        "name": "run",
        "values": [1.5, None, True, (1, "a"), {"nested": [2, 3]}],
    }


def _walk(obj: Any, out: list[Any]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        out.append(("dict", type(obj), list(obj.keys())))
        for v in obj.values():
            _walk(v, out)
    elif isinstance(obj, list | tuple):
        out.append((type(obj), len(obj)))
        for v in obj:
            _walk(v, out)
    else:
        out.append(obj)


def assert_same(got: Any, expected: Any) -> None:
    """Same structure, values, tensor types, views and storage sharing."""
    a: list[Any] = []
    b: list[Any] = []
    _walk(got, a)
    _walk(expected, b)
    assert len(a) == len(b)
    groups_a: dict[int, int] = {}
    groups_b: dict[int, int] = {}
    for x, y in zip(a, b, strict=True):
        if not isinstance(y, torch.Tensor):
            assert x == y
            continue
        assert isinstance(x, torch.Tensor)
        assert type(x) is type(y)
        assert (x.dtype, x.shape, x.stride()) == (y.dtype, y.shape, y.stride())
        assert (x.storage_offset(), x.requires_grad) == (y.storage_offset(), y.requires_grad)
        assert torch.equal(x, y)
        # The n-th distinct storage met in one is the n-th in the other.
        ga = groups_a.setdefault(x.untyped_storage()._cdata, len(groups_a))
        gb = groups_b.setdefault(y.untyped_storage()._cdata, len(groups_b))
        assert ga == gb
    assert len(groups_a) == len(groups_b)


def torch_saved(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_small_state_matches_torch_save_for_every_feature(tmp_path: Path) -> None:
    state = many_tensors(200)
    path = str(tmp_path / "ckpt.pt")
    save_file(state, path)
    verify_file(path)
    expected = torch_saved(state)
    for weights_only in (True, False):
        for mmap in (True, False):
            got = torch.load(path, weights_only=weights_only, mmap=mmap)
            assert_same(got, expected)
    assert_same(load(path), expected)
    tied = expected["model"]
    assert tied["embed.weight"].untyped_storage()._cdata == tied["window"].untyped_storage()._cdata


@pytest.mark.timeout(300)  # ~45 s alone (the comparison with torch.save is per tensor)
def test_hundred_thousand_tensors_round_trip(tmp_path: Path) -> None:
    state = many_tensors(100_000)
    path = str(tmp_path / "ckpt.pt")
    save_file(state, path)
    expected = torch_saved(state)
    assert_same(torch.load(path, weights_only=True), expected)
    assert_same(load(path), state)


def test_archive_layout_is_torch_saves(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _fastsave.save({"a": torch.arange(3.0), "b": torch.ones(2, dtype=torch.bool)}, buf)
    archive = zipfile.ZipFile(buf)
    names = [i.filename for i in archive.infolist()]
    assert names == [
        "archive/data.pkl",
        "archive/.format_version",
        "archive/.storage_alignment",
        "archive/byteorder",
        "archive/data/0",
        "archive/data/1",
        "archive/version",
        "archive/.data/serialization_id",
    ]
    raw = buf.getvalue()
    for info in archive.infolist():
        assert info.compress_type == zipfile.ZIP_STORED
        assert _data_start(raw, info) % 64 == 0
    assert _stored(raw, archive.getinfo("archive/data/0")) == torch.arange(3.0).numpy().tobytes()
    assert _stored(raw, archive.getinfo("archive/version")) == b"3\n"
    reference = io.BytesIO()
    torch.save({"a": torch.arange(3.0), "b": torch.ones(2, dtype=torch.bool)}, reference)
    ref = reference.getvalue()
    with zipfile.ZipFile(reference) as theirs:
        for name in (".format_version", ".storage_alignment", "byteorder"):
            ours = _stored(raw, archive.getinfo(f"archive/{name}"))
            assert ours == _stored(ref, theirs.getinfo(f"archive/{name}"))


def _data_start(raw: bytes, info: zipfile.ZipInfo) -> int:
    o = info.header_offset
    name_len = int.from_bytes(raw[o + 26 : o + 28], "little")
    extra_len = int.from_bytes(raw[o + 28 : o + 30], "little")
    return o + 30 + name_len + extra_len


def _stored(raw: bytes, info: zipfile.ZipInfo) -> bytes:
    start = _data_start(raw, info)
    return raw[start : start + info.file_size]


def test_zip64_records_are_read_by_torch_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sizes and offsets from 100 bytes on take the zip64 fields files over 4 GiB need.
    monkeypatch.setattr(_zipwrite, "ZIP64_AT", 100)
    state = many_tensors(300)
    path = str(tmp_path / "ckpt.pt")
    save_file(state, path)
    with zipfile.ZipFile(path) as archive:
        assert any(len(i.extra) for i in archive.infolist())  # zip64 fields present
    assert_same(torch.load(path, weights_only=True), torch_saved(state))
    assert_same(torch.load(path, weights_only=True, mmap=True), torch_saved(state))


def test_falls_back_to_torch_save_for_what_it_cannot_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []
    real = torch.save

    def spy(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(obj)
        real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spy)
    path = str(tmp_path / "plain.pt")
    save_file({"a": torch.ones(3)}, path)
    assert calls == []  # written by the fast writer
    meta = {"m": torch.empty(3, 2, device="meta"), "a": torch.ones(3)}
    save_file(meta, path)
    assert len(calls) == 1
    loaded = torch.load(path, weights_only=True)
    assert loaded["m"].device.type == "meta" and loaded["m"].shape == (3, 2)
    assert torch.equal(loaded["a"], torch.ones(3))
    # A storage viewed as two dtypes: torch.save refuses it, and so does the fallback.
    raw = torch.zeros(8)
    with pytest.raises(RuntimeError, match="view the same data as different types"):
        save_file({"f": raw, "i": raw.view(torch.int32)}, path)
    assert len(calls) == 2
    assert torch.load(path, weights_only=True)["m"].device.type == "meta"  # left as it was


def test_other_tensor_kinds_are_pickled_as_torch_pickles_them(tmp_path: Path) -> None:
    dense = torch.randn(4, 4)
    state = {
        "sparse": dense.to_sparse(),
        "conj": torch.randn(3, dtype=torch.complex64).conj(),
        "u16": torch.arange(5).to(torch.uint16),
        "dense": dense,
        "storage_view": dense[1],
    }
    path = str(tmp_path / "k.pt")
    save_file(state, path)
    got = torch.load(path, weights_only=True)
    expected = torch_saved(state)
    assert torch.equal(got["sparse"].to_dense(), expected["sparse"].to_dense())
    assert got["conj"].is_conj() and torch.equal(
        got["conj"].resolve_conj(), state["conj"].resolve_conj()
    )
    assert torch.equal(got["u16"], state["u16"])
    assert got["dense"].untyped_storage()._cdata == got["storage_view"].untyped_storage()._cdata


def test_bare_storages_and_a_non_default_alignment_go_to_torch_save(tmp_path: Path) -> None:
    path = str(tmp_path / "s.pt")
    untyped = torch.arange(4.0).untyped_storage()
    save_file({"us": untyped, "ts": torch.arange(3).storage()}, path)
    loaded = torch.load(path, weights_only=True)
    assert bytes(loaded["us"]) == bytes(untyped)
    assert loaded["ts"].tolist() == [0, 1, 2]
    t = torch.arange(4.0)
    with pytest.raises(RuntimeError, match="view the same data as different types"):
        save_file({"t": t, "s": t.untyped_storage()}, path)
    from torch.utils.serialization import config

    saved_alignment = config.save.storage_alignment
    config.save.storage_alignment = 4096
    try:
        save_file({"a": torch.ones(3), "b": torch.zeros(5)}, path)
    finally:
        config.save.storage_alignment = saved_alignment
    with zipfile.ZipFile(path) as archive:
        infos = [i for i in archive.infolist() if "/data/" in i.filename]
    raw = Path(path).read_bytes()
    # Each record's data starts on the 4096-byte alignment, as torch.save lays it out.
    starts = [
        i.header_offset
        + 30
        + int.from_bytes(raw[i.header_offset + 26 : i.header_offset + 28], "little")
        + int.from_bytes(raw[i.header_offset + 28 : i.header_offset + 30], "little")
        for i in infos
    ]
    assert [s % 4096 for s in starts] == [0, 0]
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["a"], torch.ones(3)) and torch.equal(loaded["b"], torch.zeros(5))
