"""Checkpoints as released (issue 19): vision-language, MTP, RoPE base 1e7 in rope_parameters.

The fixtures must look like the releases (a synthetic preset whose names or config differ from
what transformers builds would hide the failures these tests exist for), a vision tower is
never dropped without ``--text-only``, and a Qwen3-Next config gives readers that predate
``rope_parameters`` the source's RoPE base, not their silent default of 10,000.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from corrupt import error_line, run_cli
from transformers import (
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
)

from gdnfuse.arch import VISION_SIDE_FILES
from gdnfuse.checkpoint import open_checkpoint
from gdnfuse.convert import convert, plan_source
from gdnfuse.errors import GdnfuseError
from gdnfuse.synthetic import PRESETS, config_for, tensor_shapes, write_checkpoint
from gdnfuse.verify import verify

OPTS: dict[str, Any] = {"workers": 1}
TINY_MOE = replace(PRESETS["tiny"], intermediate=0, experts=4, moe_intermediate=16,
                   experts_per_tok=2, fused_experts=True)  # fmt: skip


@pytest.fixture(scope="module")
def vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("vl") / "src", "tiny", shard_bytes=60_000)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_synthetic_names_and_shapes_are_what_transformers_builds(moe: bool) -> None:
    """Every tensor transformers' ConditionalGeneration class holds, by name and shape, from
    the preset's own config.json (MTP aside: transformers neither builds nor loads mtp.*)."""
    shape = TINY_MOE if moe else PRESETS["tiny"]
    config = config_for(shape, "BF16", conditional=True)
    cls, cfg_cls = ((Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeConfig) if moe
                    else (Qwen3_5ForConditionalGeneration, Qwen3_5Config))  # fmt: skip
    with torch.device("meta"):
        model = cls(cfg_cls(**{k: v for k, v in config.items() if k != "architectures"}))
    ours = {n: s for n, s in tensor_shapes(shape) if not n.startswith("mtp.")}
    theirs = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert ours == theirs
    text = model.config.text_config
    assert text.rope_parameters["rope_theta"] == 1e7 and text.mtp_num_hidden_layers == 1


def test_released_config_keys(vl: Path) -> None:
    config = json.loads((vl / "config.json").read_text())
    text = config["text_config"]
    assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert {"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
            "vision_config"} <= set(config)  # fmt: skip
    assert text["rope_parameters"]["rope_theta"] == 10_000_000
    assert text["rope_parameters"]["mrope_interleaved"] is True
    assert "rope_theta" not in text  # as released: only inside rope_parameters
    assert text["mtp_num_hidden_layers"] == 1 and text["mamba_ssm_dtype"] == "float32"
    names = set(json.loads((vl / "model.safetensors.index.json").read_text())["weight_map"])
    assert any(n.startswith("model.visual.blocks.") for n in names)
    assert {"mtp.fc.weight", "mtp.layers.0.self_attn.q_proj.weight"} <= names
    assert all((vl / f).is_file() for f in VISION_SIDE_FILES if f != "processor_config.json")


def test_engine_output_of_a_vl_source_needs_text_only(vl: Path, tmp_path: Path) -> None:
    """Without --text-only: one line naming the vision tower and what to do, nothing written;
    the same for the API. --text-only on a Qwen3.5-named output is refused (it keeps it)."""
    for flags in (["--engine", "transformers"], ["--arch", "qwen3-next"]):
        proc = run_cli("convert", vl, "--out", tmp_path / "o", *flags)
        assert proc.returncode == 2
        line = error_line(proc)
        assert "vision tower" in line and "--text-only" in line and "serve the source" in line
        assert not (tmp_path / "o").exists()
    with pytest.raises(GdnfuseError, match="text_only=True"):
        convert(vl, tmp_path / "api", engine="transformers", **OPTS)
    assert not (tmp_path / "api").exists()
    proc = run_cli("convert", vl, "--out", tmp_path / "p", "--text-only")
    assert proc.returncode == 2 and "keeps it" in error_line(proc)


def test_text_only_output_says_what_it_dropped(vl: Path, tmp_path: Path) -> None:
    proc = run_cli("convert", vl, "--out", tmp_path / "o", "--engine", "transformers",
                   "--text-only", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["vision_tower_tensors"] == summary["arch"]["dropped_tensors"] > 0
    assert summary["arch"]["dropped_files"] == ["preprocessor_config.json",
                                                "video_preprocessor_config.json"]
    assert "text-only output" in proc.stderr and "vision tower" in proc.stderr
    for name in VISION_SIDE_FILES:
        assert not (tmp_path / "o" / name).exists()
    assert (tmp_path / "o" / "chat_template.jinja").is_file()
    assert summary["loaded_by"] and "transformers" in summary["loaded_by"]
    # Dry run and inspect say it beforehand.
    proc = run_cli("convert", vl, "--out", tmp_path / "d", "--engine", "transformers",
                   "--text-only", "--dry-run")  # fmt: skip
    assert proc.returncode == 0 and "vision tower" in proc.stderr, proc.stderr
    proc = run_cli("inspect", vl)
    assert proc.returncode == 0, proc.stderr
    assert "convert --engine transformers: with --text-only:" in proc.stdout, proc.stdout


def test_verify_passes_text_only_and_catches_a_carried_processor(vl: Path, tmp_path: Path) -> None:
    out = convert(vl, tmp_path / "o", engine="transformers", text_only=True, **OPTS).out
    report = verify(out, against=vl, numeric=False)
    assert report.ok, [c.detail for c in report.failures]
    dropped = next(c for c in report.checks if c.name == "exact.dropped")
    assert dropped.ok and "intentionally left out" in dropped.detail
    assert "transformers" in report.to_json()["loaded_by"]
    shutil.copy(vl / "preprocessor_config.json", out / "preprocessor_config.json")
    report = verify(out, against=vl, numeric=False)
    assert [c.file for c in report.failures] == ["preprocessor_config.json"]


def test_qwen3_next_config_carries_rope_where_every_reader_looks(vl: Path, tmp_path: Path) -> None:
    """The base and fraction in rope_parameters and at the top level (sglang 0.5.23,
    transformers 4.57 and mlx-lm read only the latter); intermediate_size for mlx-lm's
    required field; the MTP count under vLLM's Qwen3-Next name. A config with base 10,000
    planted at the top level fails verify's exact.config."""
    for shape, name in ((PRESETS["tiny"], "dense"), (TINY_MOE, "moe")):
        src = write_checkpoint(tmp_path / f"{name}-src", shape)
        out = convert(src, tmp_path / name, engine="transformers", text_only=True,
                      **OPTS).out  # fmt: skip
        config = json.loads((out / "config.json").read_text())
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 1e7
        assert config["partial_rotary_factor"] == 0.25
        assert "mrope_section" not in config["rope_parameters"]
        assert isinstance(config["intermediate_size"], int)
        assert config["num_nextn_predict_layers"] == config["mtp_num_hidden_layers"] == 1
        assert config["mamba_ssm_dtype"] == "float32"
    config["rope_theta"] = 10_000.0
    (out / "config.json").write_text(json.dumps(config))
    report = verify(out, against=tmp_path / "moe-src", numeric=False)
    assert [(c.name, c.file) for c in report.failures] == [("exact.config", "config.json")]
    assert "rope_theta is 10000.0" in report.failures[0].detail


def test_default_output_says_no_engine_loads_it(vl: Path, tmp_path: Path) -> None:
    proc = run_cli("convert", vl, "--out", tmp_path / "o", "--tp", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["loaded_by"] == []
    note = [ln for ln in proc.stderr.splitlines() if "no engine loads this output" in ln]
    assert len(note) == 1 and "--engine" in note[0] and "split source" in note[0]
    report = verify(tmp_path / "o", against=vl, numeric=False)
    assert report.ok and report.to_json()["loaded_by"] == []
    assert any(ln.startswith("INFO no engine") for ln in report.lines())


def test_mtp_weights_keep_their_names(vl: Path, tmp_path: Path) -> None:
    """vLLM's qwen3_next_mtp.py and sglang's qwen3_next.py (is_mtp) read mtp.* as Qwen3.5
    stores it; the fused main experts are split per expert, the MTP layer's stay per expert."""
    src = write_checkpoint(tmp_path / "moe", TINY_MOE)
    out = convert(src, tmp_path / "o", engine="transformers", text_only=True, **OPTS).out
    names = set(open_checkpoint(out).tensors)
    mtp_src = {n for n in open_checkpoint(src).tensors if n.startswith("mtp.")}
    assert mtp_src and mtp_src <= names
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in names
    assert not any(n.endswith("experts.gate_up_proj") for n in names)
    assert plan_source(src, engine="transformers", text_only=True).summary()["arch"][
        "fused_expert_tensors_split"] == 2 * TINY_MOE.layers  # fmt: skip


def test_rope_only_in_rope_parameters_is_a_misread_for_top_level_readers(tmp_path: Path) -> None:
    """A Qwen3-Next config with base 1e7 only in rope_parameters (what transformers 5 writes
    when it re-saves one): sglang 0.5.23 builds base 10,000 (misreads), mlx-lm lacks a
    required field (refuses); gdnfuse's own outputs carry both, and load."""
    from gdnfuse import loaders

    src = write_checkpoint(tmp_path / "src", TINY_MOE)
    out = convert(src, tmp_path / "o", engine="sglang", text_only=True, **OPTS).out
    assert loaders.verdicts(out)["sglang"].outcome.value == "loads"
    config = json.loads((out / "config.json").read_text())
    del config["rope_theta"], config["partial_rotary_factor"]
    (out / "config.json").write_text(json.dumps(config))
    found = loaders.verdicts(out)
    assert found["sglang"].outcome.value == "misreads" and "rope" in found["sglang"].reason.lower()
    assert found["mlx"].outcome.value == "refuses"
    assert found["transformers"].outcome.value == "loads"
