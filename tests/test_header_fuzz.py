"""Fuzz the safetensors header reader: whatever the bytes, the outcome is a valid header or
one clear :class:`GdnfuseError` -- never another exception, a hang or a huge allocation.

CI runs a bounded number of examples per property (300, with a per-example deadline). For
a longer hunt raise the count with an environment variable, e.g.::

    GDNFUSE_FUZZ_EXAMPLES=200000 /work/venv/bin/python -m pytest tests/test_header_fuzz.py

(set ``GDNFUSE_FUZZ_SEED`` too to reproduce a run; by default CI runs are derandomized
so that they are repeatable, and longer runs draw fresh random examples).
"""

from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from gdnfuse.errors import GdnfuseError
from gdnfuse.safetensors_file import (
    DTYPE_BYTES,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    encode_header,
    parse_header,
    read_header,
)

EXAMPLES = int(os.environ.get("GDNFUSE_FUZZ_EXAMPLES", "300"))
LONG_RUN = "GDNFUSE_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=2),
    derandomize=not LONG_RUN,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
if "GDNFUSE_FUZZ_SEED" in os.environ:
    FUZZ = settings(FUZZ, derandomize=False)
SEED = seed(int(os.environ["GDNFUSE_FUZZ_SEED"])) if "GDNFUSE_FUZZ_SEED" in os.environ else None


def fuzz(test: Callable[..., None]) -> Callable[..., None]:
    test = FUZZ(test)
    return SEED(test) if SEED else test


PATH = "/fuzz/model-00001-of-00002.safetensors"


def outcome(call: Callable[[], SafetensorsHeader]) -> SafetensorsHeader | None:
    """Run the reader; only a valid header or a one-line GdnfuseError may come back."""
    try:
        header = call()
    except GdnfuseError as e:
        text = str(e)
        assert "\n" not in text and "\r" not in text, text
        assert len(text) < 1200, f"{len(text)}-character message"
        return None
    assert isinstance(header, SafetensorsHeader)
    position = 0  # a header that passes must describe the buffer exactly
    for t in header.tensors:
        assert t.begin == position and DTYPE_BYTES[t.dtype] >= 1
        position = t.end
    assert position == header.file_size - header.data_start
    return header


# --- strategies ---------------------------------------------------------------------------

HUGE = st.integers(min_value=-(2**80), max_value=2**80)
json_scalars = st.one_of(
    st.none(), st.booleans(), HUGE, st.integers(0, 64), st.floats(allow_nan=False),
    st.text(max_size=12), st.sampled_from(list(DTYPE_BYTES)),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
shapes = st.lists(st.integers(0, 6), max_size=3)
tensor_specs = st.lists(
    st.tuples(st.text(min_size=1, max_size=20), st.sampled_from(list(DTYPE_BYTES)), shapes),
    max_size=6,
    unique_by=lambda t: t[0],
)


def valid_header(specs: list[tuple[str, str, list[int]]]) -> tuple[dict[str, Any], int]:
    """A correct header object for ``specs`` and its data size."""
    obj: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        if name == "__metadata__":
            continue
        obj[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return obj, offset


@st.composite
def mutated_headers(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid header with a few targeted mutations; returns (raw JSON bytes, file size)."""
    obj, data_size = valid_header(draw(tensor_specs))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["field", "offsets", "shape", "entry", "metadata",
                                     "extra", "drop", "deep"]))  # fmt: skip
        names = [k for k, v in obj.items() if k != "__metadata__" and isinstance(v, dict)]
        entry = obj[draw(st.sampled_from(names))] if names else None
        if kind == "metadata":
            obj["__metadata__"] = draw(json_values)
        elif kind == "extra" or entry is None:
            obj[draw(st.text(max_size=30))] = draw(json_values)
        elif kind == "field":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets", "x"]))] = draw(
                json_values
            )
        elif kind == "offsets":
            offsets = entry.get("data_offsets")
            if isinstance(offsets, list) and len(offsets) == 2:
                entry["data_offsets"] = [o + draw(HUGE | st.integers(-3, 3))
                                         if isinstance(o, int) else o for o in offsets]  # fmt: skip
        elif kind == "shape":  # huge dims: the product must not run away
            entry["shape"] = draw(st.lists(HUGE | st.integers(0, 2**64), max_size=400))
        elif kind == "entry":
            obj[draw(st.sampled_from(names))] = draw(json_values)
        elif kind == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        else:  # deeply nested value
            depth = draw(st.integers(1, 3000))
            entry["shape"] = "@@"
            raw = json.dumps(obj).replace('"@@"', "[" * depth + "]" * depth)
            return raw.encode(), 8 + len(raw) + data_size + draw(st.integers(-4, 4))
    raw = json.dumps(obj).encode()
    if draw(st.booleans()):  # byte-level damage too
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, max(0, len(raw) - 1)))
            raw = raw[:i] + draw(st.binary(max_size=3)) + raw[i + 1 :]
    return raw, 8 + len(raw) + data_size + draw(st.sampled_from([0, 0, 0, -1, 1, -100, 7]))


# --- properties ---------------------------------------------------------------------------


@fuzz
@given(raw=st.binary(max_size=2000), file_size=st.integers(-10, 2**64))
def test_random_bytes(raw: bytes, file_size: int) -> None:
    outcome(lambda: parse_header(raw, file_size, PATH))


@fuzz
@given(case=mutated_headers())
def test_mutated_json_headers(case: tuple[bytes, int]) -> None:
    raw, file_size = case
    outcome(lambda: parse_header(raw, file_size, PATH))


@fuzz
@given(specs=tensor_specs)
def test_valid_headers_round_trip(specs: list[tuple[str, str, list[int]]]) -> None:
    """The fuzz is not vacuous: correct headers are accepted, exactly as written."""
    obj, data_size = valid_header(specs)
    entries = [(k, v["dtype"], tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0])
               for k, v in obj.items() if k != "__metadata__"]  # fmt: skip
    blob = encode_header(entries, obj["__metadata__"])
    header = outcome(lambda: parse_header(blob[8:], len(blob) + data_size, PATH))
    assert header is not None
    assert {t.name: (t.dtype, list(t.shape)) for t in header.tensors} == {
        k: (v["dtype"], v["shape"]) for k, v in obj.items() if k != "__metadata__"
    }


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "model-00001-of-00002.safetensors"


@fuzz
@given(
    case=mutated_headers(),
    prefix=st.one_of(
        st.just(None), st.integers(0, 2**64 - 1), st.sampled_from([MAX_HEADER_BYTES + 1, 2**63])
    ),
    cut=st.integers(0, 40),
)
def test_read_header_on_files(
    fuzz_file: Path, case: tuple[bytes, int], prefix: int | None, cut: int
) -> None:
    """Whole files: a lying length prefix or a cut file never makes the reader allocate."""
    raw, file_size = case
    data = b"\0" * max(0, file_size - 8 - len(raw))
    blob = struct.pack("<Q", len(raw) if prefix is None else prefix) + raw + data
    fuzz_file.write_bytes(blob[: max(0, len(blob) - cut)])
    tracemalloc.start()
    try:
        outcome(lambda: read_header(fuzz_file))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * len(blob) + (1 << 20), f"{peak} bytes allocated for a {len(blob)}-byte file"


# --- the pathological cases, pinned -------------------------------------------------------


def test_a_header_length_near_2_64_allocates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "lying.safetensors"
    for n in (2**64 - 1, 2**63, MAX_HEADER_BYTES + 1, 10_000):
        path.write_bytes(struct.pack("<Q", n) + b"{}")
        tracemalloc.start()
        try:
            with pytest.raises(GdnfuseError, match="header length") as caught:
                read_header(path)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20 and path.name in str(caught.value)


@pytest.mark.parametrize(
    "shape",
    [[2**62] * 2000, [10**4000, 10**4000], [0, 10**4000], [2**64] * 3],
    ids=["2000-dims-of-2^62", "two-4000-digit-dims", "zero-times-huge", "three-2^64"],
)
def test_shapes_whose_product_overflows_fail_fast(shape: list[int]) -> None:
    raw = json.dumps({"t": {"dtype": "BF16", "shape": shape, "data_offsets": [0, 4]}}).encode()
    started = time.perf_counter()
    with pytest.raises(GdnfuseError) as caught:
        parse_header(raw, 8 + len(raw) + 4, PATH)
    assert time.perf_counter() - started < 0.5
    text = str(caught.value)
    assert "tensor t" in text and "\n" not in text and len(text) < 400


def test_deep_nesting_and_unhashable_fields_are_clear_errors() -> None:
    for raw in (b"[" * 100_000, b'{"t": {"dtype": ["BF16"], "shape": [], "data_offsets": [0,0]}}',
                b'{"t": {"dtype": {"a": 1}, "shape": [], "data_offsets": [0,0]}}'):  # fmt: skip
        with pytest.raises(GdnfuseError):
            parse_header(raw, 8 + len(raw), PATH)


def test_hostile_names_stay_on_one_bounded_line() -> None:
    name = "evil\nname" + "x" * 100_000
    raw = json.dumps({name: {"dtype": "BF16", "shape": [3], "data_offsets": [0, 4]}}).encode()
    with pytest.raises(GdnfuseError) as caught:
        parse_header(raw, 8 + len(raw) + 4, PATH)
    text = str(caught.value)
    assert "\n" not in text and len(text) < 1000 and "evil\\nname" in text
