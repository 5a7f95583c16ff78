"""inspect and verify answer for checkpoints gdnfuse did not write (issue 20): a gdnfuse output
re-saved by transformers, a Qwen3-Next checkpoint without a layout record, Qwen3.5-named fused
rows nobody recorded, rows in no known order; and inspect gives verdicts for checkpoints it
cannot convert. verify finds the row order against the source, and inspect --against finds
the same one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from corrupt import run_cli
from engine_models import unstamped
from safetensors.torch import load_file, save_file
from tiny_models import build_checkpoint
from transformers import AutoModelForCausalLM

from gdnfuse.convert import convert
from gdnfuse.layout import Layout
from gdnfuse.safetensors_file import read_header
from gdnfuse.verify import verify

OPTS: dict[str, Any] = {"workers": 1}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("any")
    src = build_checkpoint(root / "src", r=2, nk=4, conditional=True, dtype=torch.float32)
    out = convert(src, root / "tf", engine="transformers", text_only=True, tp=2,
                  **OPTS).out  # fmt: skip
    return {"src": src, "tf": out}


def _strip_record(root: Path) -> None:
    """No gdnfuse record anywhere: config.json without it, shard metadata without gdnfuse.*."""
    config = json.loads((root / "config.json").read_text())
    config.pop("gdnfuse", None)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    for shard in root.glob("*.safetensors"):
        save_file(load_file(shard), shard, metadata={"format": "pt"})
    (root / "gdnfuse-manifest.json").unlink(missing_ok=True)


def _inspect(path: Path, against: Path) -> dict:
    proc = run_cli("inspect", path, "--against", against, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _loads(shown: dict) -> list[str]:
    return [e["engine"] for e in shown["engines"].values() if e["outcome"] == "loads"]


def test_resaved_by_transformers_passes(made: dict[str, Path], tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(made["tf"], dtype=torch.float32)
    model.save_pretrained(tmp_path / "resaved", max_shard_size="20KB")
    for side in made["tf"].iterdir():  # the tokenizer and other side files go along
        if not (tmp_path / "resaved" / side.name).exists() and side.suffix != ".safetensors":
            shutil.copy(side, tmp_path / "resaved" / side.name)
    (tmp_path / "resaved" / "gdnfuse-manifest.json").unlink()
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "rope_theta" not in config  # transformers 5 writes rope_parameters alone
    assert len(list((tmp_path / "resaved").glob("*.safetensors"))) > 2
    report = verify(tmp_path / "resaved", against=made["src"])
    assert report.ok, [(c.name, c.detail) for c in report.failures]
    layout = next(c for c in report.checks if c.name == "exact.layout")
    assert "qwen3-next" in layout.detail
    shown = _inspect(tmp_path / "resaved", made["src"])
    assert shown["rows"].startswith("qwen3-next") and "transformers" in _loads(shown)
    assert set(_loads(shown)) == set(report.loaded_by or ())



def test_qwen3_next_without_a_record_passes_and_says_so(
    made: dict[str, Path], tmp_path: Path
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(made["tf"], bare)
    _strip_record(bare)
    report = verify(bare, against=made["src"])
    assert report.ok, [(c.name, c.detail) for c in report.failures]
    details = {c.name: c.detail for c in report.checks}
    assert "no gdnfuse layout record" in details["structure.record"]
    assert "record arch entry present" not in details["structure.arch"]
    alone = verify(bare, numeric=True)  # no source: the format says grouped, as inspect reads
    assert alone.ok, [(c.name, c.detail) for c in alone.failures]
    assert set(_loads(_inspect(bare, made["src"]))) == set(report.loaded_by or ())


def test_qwen3_5_names_without_a_record_are_found(made: dict[str, Path], tmp_path: Path) -> None:
    """tp-blocked T=2 rows under Qwen3.5 names, no record: verify names the order, and the
    verdicts follow from it (sglang's Qwen3.5 reads plain rows: it would misread these)."""
    tpb = convert(made["src"], tmp_path / "tpb", layout=Layout.TP_BLOCKED, tp=2,
                  **OPTS).out  # fmt: skip
    bare = unstamped(tpb, tmp_path / "bare")
    _strip_record(bare)
    report = verify(bare, against=made["src"])
    assert report.ok, [(c.name, c.detail) for c in report.failures]
    assert "tp-blocked T=2" in next(c.detail for c in report.checks if c.name == "exact.layout")
    shown = _inspect(bare, made["src"])
    assert shown["rows"].startswith("tp-blocked T=2")
    assert shown["engines"]["sglang"]["outcome"] == "misreads"
    assert set(_loads(shown)) == set(report.loaded_by or ())


def test_rows_in_no_known_order_fail(made: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(made["tf"], bad)
    _strip_record(bad)
    for shard in bad.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if name.endswith("layers.0.linear_attn.in_proj_ba.weight"):
                t[[0, 1]] = t[[1, 0]]  # two b rows of one key head swapped: no layout does that
        save_file(tensors, shard, metadata={"format": "pt"})
    report = verify(bad, against=made["src"], numeric=False)
    layout = next(c for c in report.checks if c.name == "exact.layout")
    assert not layout.ok and "none of the known orders" in layout.detail
    assert report.loaded_by == ()
    shown = _inspect(bad, made["src"])
    assert shown["rows"].startswith("none of") and shown["engines"]["transformers"]["outcome"] == (
        "misreads")  # fmt: skip


def test_inspect_gives_verdicts_for_what_it_cannot_convert(
    made: dict[str, Path], tmp_path: Path
) -> None:
    gptq = tmp_path / "gptq"
    shutil.copytree(made["src"], gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (gptq / "config.json").write_text(json.dumps(config))
    labelled = tmp_path / "labelled"
    shutil.copytree(made["src"], labelled)
    text = json.loads((labelled / "config.json").read_text())["text_config"]
    (labelled / "config.json").write_text(json.dumps({**text, "model_type": "qwen3_next",
                                                      "architectures": ["Qwen3NextForCausalLM"]}))
    for path, why in ((gptq, "gptq"), (labelled, "qwen3_next")):
        proc = run_cli("inspect", path)
        assert proc.returncode == 0, proc.stderr
        assert "cannot convert" in proc.stderr and why in proc.stderr, proc.stderr
        assert "LOADS" in proc.stdout or "REFUSES" in proc.stdout, proc.stdout
        shown = json.loads(run_cli("inspect", path, "--json").stdout)
        assert shown["convert"].startswith("cannot convert") and len(shown["engines"]) == 6


def test_a_broken_record_fails_even_with_the_source(made: dict[str, Path], tmp_path: Path) -> None:
    """Finding the rows against the source never hides a record that is there but unusable."""
    out = convert(made["src"], tmp_path / "o", tp=2, workers=1).out
    config = json.loads((out / "config.json").read_text())
    config["gdnfuse"]["tp"] = 3
    (out / "config.json").write_text(json.dumps(config))
    (out / "gdnfuse-manifest.json").unlink()
    report = verify(out, against=made["src"], numeric=False)
    assert not report.ok
    record = next(c for c in report.checks if c.name == "structure.record")
    assert not record.ok and "tp 3" in record.detail


def test_metadata_cross_checks_the_found_order(made: dict[str, Path], tmp_path: Path) -> None:
    """No record in config.json, shard metadata present: it must agree with the bytes."""
    tpb = convert(made["src"], tmp_path / "tpb", layout=Layout.TP_BLOCKED, tp=2, workers=1).out
    bare = unstamped(tpb, tmp_path / "bare")
    config = json.loads((bare / "config.json").read_text())
    del config["gdnfuse"]
    (bare / "config.json").write_text(json.dumps(config))
    (bare / "gdnfuse-manifest.json").unlink()
    assert verify(bare, against=made["src"], numeric=False).ok  # metadata agrees
    shard = next(p for p in sorted(bare.glob("*.safetensors"))
                 if "gdnfuse.layout" in (read_header(p).metadata or {}))  # fmt: skip
    save_file(load_file(shard), shard, metadata={"format": "pt", "gdnfuse.layout": "qwen3-next",
                                                 "gdnfuse.tp": "2"})  # fmt: skip
    report = verify(bare, against=made["src"], numeric=False)
    assert [(c.name, c.file) for c in report.failures] == [("structure.record", shard.name)]


def test_gpu_path_reads_the_found_order(made: dict[str, Path], tmp_path: Path) -> None:
    """The GPU check (torch fallbacks on CPU) runs on a fused checkpoint without a record,
    with the order verify found against the source."""
    from gdnfuse.record import Record
    from gdnfuse.verify import check_gpu

    tpb = convert(made["src"], tmp_path / "tpb", layout=Layout.TP_BLOCKED, tp=2, workers=1).out
    bare = unstamped(tpb, tmp_path / "bare")
    _strip_record(bare)
    results = check_gpu(bare, made["src"], 2, "cpu", rows=Record(Layout.TP_BLOCKED, 2))
    assert results and all(r.ok for r in results), [r.detail for r in results]
    (wrong,) = check_gpu(bare, made["src"], 2, "cpu")[:1]
    assert not wrong.ok and "record" in wrong.detail  # without it: no record, no GPU path


def test_cannot_convert_says_the_checkpoints_reason(made: dict[str, Path], tmp_path: Path) -> None:
    gptq = tmp_path / "gptq"
    shutil.copytree(made["src"], gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    proc = run_cli("inspect", gptq, "--tp", "3")
    assert proc.returncode == 0 and "gptq" in proc.stderr, proc.stderr


def test_fp8_split_form_needs_both_halves() -> None:
    from gdnfuse.engines import fp8_ignore_forms

    def forms(names: list[str]) -> frozenset[str] | None:
        return fp8_ignore_forms({"quantization_config": {"modules_to_not_convert": names}})

    la = "model.layers.0.linear_attn."
    assert forms([la + "in_proj_b"]) == frozenset()
    assert forms([la + "in_proj_b", la + "in_proj_a"]) == {"split"}
    assert forms([la + "in_proj_ba", la + "in_proj_a"]) == {"fused"}
