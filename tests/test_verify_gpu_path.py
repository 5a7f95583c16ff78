"""`verify --device` wiring: the bf16 GPU-path check (run here on CPU with torch fallbacks)
passes a good conversion and catches a layout record that lies about the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gdnfuse.convert import convert
from gdnfuse.layout import Layout
from gdnfuse.record import RECORD_KEY
from gdnfuse.synthetic import write_checkpoint
from gdnfuse.verify import check_gpu


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("src") / "m", "tiny", shard_bytes=200_000)


@pytest.mark.parametrize("layout", list(Layout))
def test_gpu_path_passes_a_good_conversion(source: Path, tmp_path: Path, layout: Layout) -> None:
    out = tmp_path / "out"
    convert(source, out, layout=layout, tp=2)
    results = check_gpu(out, source, 2, "cpu")
    assert len(results) == 3  # one per GDN layer of the tiny preset
    assert all(r.ok for r in results), [r.detail for r in results if not r.ok]


def test_gpu_path_catches_a_wrong_layout_record(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(source, out, layout=Layout.QWEN3_NEXT, tp=2)
    config = json.loads((out / "config.json").read_text())
    config[RECORD_KEY]["layout"] = "tp-blocked"  # nk/tp = 2: the layouts differ
    (out / "config.json").write_text(json.dumps(config))
    results = check_gpu(out, source, 2, "cpu")
    assert results and not any(r.ok for r in results)


def test_gpu_path_needs_the_source(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(source, out, tp=2)
    (result,) = check_gpu(out, None, 2, "cpu")
    assert result.skipped and "--against" in result.detail


def test_gpu_path_honours_layers_and_fails_a_broken_output(source: Path, tmp_path: Path) -> None:
    """`verify --device --layers 1` runs layer 1 only; a truncated output shard is a failed
    check naming the file, not an exception."""
    out = tmp_path / "out"
    convert(source, out, tp=2)
    layer1 = "model.language_model.layers.1.linear_attn."
    results = check_gpu(out, source, 2, "cpu", layers=[layer1])
    assert [r.tensor for r in results] == ["model.language_model.layers.1.linear_attn"]
    shard = next(p for p in sorted(out.glob("*.safetensors")))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    (result,) = check_gpu(out, source, 2, "cpu")
    assert not result.ok and result.file and shard.name in result.file, result
