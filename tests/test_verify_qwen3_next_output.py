"""``gdnfuse verify`` on ``--arch qwen3-next`` outputs (Qwen3.5 relabelled as Qwen3-Next).

Tiny transformers-saved Qwen3.5 sources (dense and MoE, text-only and ConditionalGeneration,
experts per expert and fused on disk, an MTP GDN layer) are converted with ``--arch
qwen3-next``; verify must pass them and, with ``--against``, catch faults planted in the
relabelled output, naming the output tensor: gate and up swapped in one expert, a flipped
byte in a renamed tensor, key-head groups swapped in a fused GDN tensor, a missing expert.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_qwen3_next_output import fuse_experts_on_disk
from test_verify import (
    edit_json,
    failures,
    locate,
    named,
    report_json,
    resync_manifest,
    rewrite_shard,
    run,
    shard_of,
    swap_rows,
)
from tiny_models import build_checkpoint

from gdnfuse.arch import Arch
from gdnfuse.checkpoint import INDEX_NAME, open_checkpoint
from gdnfuse.convert import convert
from gdnfuse.errors import GdnfuseError
from gdnfuse.layout import Layout
from gdnfuse.record import RECORD_KEY

DK, DV = 8, 4  # tiny_models defaults (nk = 4)
CASES: dict[str, dict[str, Any]] = {
    "dense-text": dict(r=1, tp=2),
    "dense-cg": dict(r=3, conditional=True),
    "moe-text": dict(r=2, moe=True, mtp=True),
    "moe-cg-fusedexp": dict(r=2, moe=True, conditional=True, fused=True),
}
LA1 = "model.layers.1.linear_attn."
QKVZ1 = f"{LA1}in_proj_qkvz.weight"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Each case: (source, --arch qwen3-next output)."""
    root = tmp_path_factory.mktemp("verify-arch")
    done = {}
    for key, kw in CASES.items():
        kw = dict(kw)
        fused, tp = kw.pop("fused", False), kw.pop("tp", 1)
        # fuse_experts_on_disk needs all experts of a layer in one shard.
        src = build_checkpoint(root / key, shard_size="10MB" if fused else "40KB", **kw)
        if fused:
            fuse_experts_on_disk(src)
        out = root / f"{key}.out"
        convert(src, out, layout=Layout.QWEN3_NEXT, tp=tp, arch=Arch.QWEN3_NEXT,
                text_only=True, workers=1)  # fmt: skip
        done[key] = (src, out)
    return done


@pytest.fixture()
def copy(made: dict[str, tuple[Path, Path]], tmp_path: Path) -> Callable[[str], Path]:
    """A private copy of one case's output, to plant a fault in."""
    return lambda key: Path(shutil.copytree(made[key][1], tmp_path / key))


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["name"] == name)


def swap_tensors(root: Path, a: str, b: str) -> None:
    """Exchange the bytes of two equally sized tensors, in place."""
    (pa, sa, _), (pb, sb, _) = locate(root, a), locate(root, b)
    n = open_checkpoint(root).tensors[a].info.nbytes
    with open(pa, "rb") as f:
        f.seek(sa)
        x = f.read(n)
    with open(pb, "rb") as f:
        f.seek(sb)
        y = f.read(n)
    for path, start, data in ((pa, sa, y), (pb, sb, x)):
        with open(path, "r+b") as f:
            f.seek(start)
            f.write(data)


# --- clean conversions pass -------------------------------------------------------------------


@pytest.mark.parametrize("key", list(CASES))
def test_clean_arch_conversion_passes(
    made: dict[str, tuple[Path, Path]], tmp_path: Path, key: str
) -> None:
    src, out = made[key]
    code, report = report_json(out, "--against", src, tmp=tmp_path)
    assert code == 0, failures(report)
    names = {c["name"] for c in report["checks"]}
    assert {"structure.arch", "exact.config", "exact.fused", "exact.tensors"} <= names
    source = open_checkpoint(src).tensors
    visual = [n for n in source if n.startswith("model.visual.")]
    assert bool(visual) == CASES[key].get("conditional", False)
    assert check(report, "exact.dropped")["detail"].startswith(f"{len(visual)} source tensors")
    moe, fused = CASES[key].get("moe", False), CASES[key].get("fused", False)
    assert f"; {6 if fused else 0} fused expert tensors cut" in check(report, "exact.tensors")[
        "detail"]  # fmt: skip
    gdn = 3 if CASES[key].get("mtp") else 2  # two decoder GDN layers (+ the MTP one)
    assert f"{gdn} GDN layers" in check(report, "numeric.forward")["detail"]
    assert "source's split weights" in check(report, "numeric.forward")["detail"]
    # Every source tensor is accounted for: fused into GDN, dropped, or compared.
    out_tensors = open_checkpoint(out).tensors
    experts = sum(".mlp.experts." in n for n in out_tensors)
    assert experts == (3 * 4 * 3 if moe else 0)  # layers x experts x {gate, up, down}
    code, report = report_json(out, tmp=tmp_path)  # without the source
    assert code == 0, failures(report)


# --- planted faults ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["moe-text", "moe-cg-fusedexp"])
def test_gate_and_up_swapped_in_one_expert(
    made: dict[str, tuple[Path, Path]], copy: Callable[[str], Path], tmp_path: Path, key: str
) -> None:
    out = copy(key)
    base = "model.layers.1.mlp.experts.2."
    gate, up = f"{base}gate_proj.weight", f"{base}up_proj.weight"
    swap_tensors(out, gate, up)
    code, report = report_json(out, "--against", made[key][0], tmp=tmp_path)
    assert code == 1
    assert {c["name"] for c in failures(report)} == {"exact.tensors"}
    for tensor in (gate, up):
        detail = named(report, "exact.tensors", tensor)["detail"]
        assert "gate and up swapped" in detail, detail
    src_name = "model.language_model.layers.1.mlp.experts."
    if key == "moe-cg-fusedexp":  # the right half of the fused source is named
        detail = named(report, "exact.tensors", gate)["detail"]
        assert f"differs from {src_name}gate_up_proj expert 2 gate rows 0..15" in detail
        assert f"its bytes are {src_name}gate_up_proj expert 2 up rows 16..31" in detail
    assert len(failures(report)) == 2


@pytest.mark.parametrize("key", ["dense-cg", "moe-cg-fusedexp"])
def test_byte_flipped_in_renamed_tensor(
    made: dict[str, tuple[Path, Path]], copy: Callable[[str], Path], tmp_path: Path, key: str
) -> None:
    out = copy(key)
    tensor = "model.layers.2.self_attn.q_proj.weight"  # model.language_model.* in the source
    path, start, _ = locate(out, tensor)
    with open(path, "r+b") as f:
        f.seek(start + 37)
        old = f.read(1)
        f.seek(start + 37)
        f.write(bytes([old[0] ^ 0x01]))
    code, report = report_json(out, "--against", made[key][0], tmp=tmp_path)
    assert code == 1
    [fail] = failures(report)
    assert fail["name"] == "exact.tensors" and fail["tensor"] == tensor
    assert "differs from model.language_model.layers.2.self_attn.q_proj.weight" in fail["detail"]
    assert "at byte 37 " in fail["detail"]


def test_key_head_groups_swapped_in_qkvz(
    made: dict[str, tuple[Path, Path]], copy: Callable[[str], Path], tmp_path: Path
) -> None:
    key, r = "dense-cg", 3
    out = copy(key)
    group = 2 * DK + 2 * r * DV
    swap_rows(out, QKVZ1, 0, group, group)
    code, report = report_json(out, "--against", made[key][0], tmp=tmp_path)
    assert code == 1
    detail = named(report, "exact.fused", QKVZ1)["detail"]
    assert "model.language_model.layers.1.linear_attn.in_proj_qkv.weight rows 0..7" in detail
    assert "max |diff|" in named(report, "numeric.forward", QKVZ1)["detail"]
    assert {c["name"] for c in failures(report)} == {"exact.fused", "numeric.forward"}


@pytest.mark.parametrize("key", ["moe-text", "moe-cg-fusedexp"])
def test_missing_expert_tensor(
    made: dict[str, tuple[Path, Path]], copy: Callable[[str], Path], tmp_path: Path, key: str
) -> None:
    out = copy(key)
    tensor = "model.layers.0.mlp.experts.3.down_proj.weight"
    nbytes = open_checkpoint(out).tensors[tensor].info.nbytes
    rewrite_shard(
        shard_of(out, tensor),
        lambda e, m: e.__delitem__(next(i for i, x in enumerate(e) if x[0] == tensor)),
    )

    def index(i: dict[str, Any]) -> None:
        del i["weight_map"][tensor]
        i["metadata"]["total_size"] -= nbytes

    edit_json(out / INDEX_NAME, index)
    resync_manifest(out)
    code, report = report_json(out, "--against", made[key][0], tmp=tmp_path)
    assert code == 1
    detail = named(report, "exact.tensors", tensor)["detail"]
    source = (
        "model.language_model.layers.0.mlp.experts.down_proj expert 3"
        if key == "moe-cg-fusedexp"
        else "model.layers.0.mlp.experts.3.down_proj.weight"
    )
    assert f"missing from the output (source: {source}," in detail, detail
    assert "missing" in named(report, "structure.arch", tensor)["detail"]
    assert {c["name"] for c in failures(report)} == {"exact.tensors", "structure.arch"}
    code, report = report_json(out, tmp=tmp_path)  # the structure check alone sees it
    assert code == 1
    named(report, "structure.arch", tensor)


@pytest.mark.parametrize(
    "fault, check_name, words",
    [
        ("no-arch-entry", "exact.config", 'has no "arch" entry'),
        ("dropped-count", "exact.config", "arch.dropped_tensors is 3"),
        ("eps", "exact.config", "rms_norm_eps is 0.5"),
        ("architectures", "structure.arch", "lacks Qwen3NextForCausalLM"),
    ],
)
def test_config_faults(
    made: dict[str, tuple[Path, Path]],
    copy: Callable[[str], Path],
    tmp_path: Path,
    fault: str,
    check_name: str,
    words: str,
) -> None:
    out = copy("dense-cg")
    edits: dict[str, Callable[[dict[str, Any]], Any]] = {
        "no-arch-entry": lambda c: c[RECORD_KEY].pop("arch"),
        "dropped-count": lambda c: c[RECORD_KEY]["arch"].update(dropped_tensors=3),
        "eps": lambda c: c.update(rms_norm_eps=0.5),
        "architectures": lambda c: c.update(architectures=["Qwen3_5ForCausalLM"]),
    }
    edit_json(out / "config.json", edits[fault])
    resync_manifest(out)
    code, report = report_json(out, "--against", made["dense-cg"][0], "--no-numeric", tmp=tmp_path)
    assert code == 1
    hits = [c for c in failures(report) if c["name"] == check_name]
    assert any(words in c["detail"] for c in hits), failures(report)


def test_qwen3_5_name_left_in_output(
    made: dict[str, tuple[Path, Path]], copy: Callable[[str], Path], tmp_path: Path
) -> None:
    """A tensor under its Qwen3.5 name is no Qwen3-Next module and no expected output."""
    out = copy("dense-cg")
    old, new = "model.norm.weight", "model.language_model.norm.weight"
    host = shard_of(out, old)
    rewrite_shard(host, lambda e, m: next(x for x in e if x[0] == old).__setitem__(0, new))
    edit_json(
        out / INDEX_NAME, lambda i: i["weight_map"].__setitem__(new, i["weight_map"].pop(old))
    )
    resync_manifest(out)
    code, report = report_json(out, "--against", made["dense-cg"][0], tmp=tmp_path)
    assert code == 1
    assert "Qwen3.5 name" in named(report, "structure.arch", new)["detail"]
    assert "not in the source" in named(report, "exact.tensors", new)["detail"]
    assert "missing from the output" in named(report, "exact.tensors", old)["detail"]


# --- bad input ----------------------------------------------------------------------------------


def test_qwen3_next_is_no_source(made: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """Verify reads qwen3_next outputs; conversion and --against still refuse them."""
    _, out = made["dense-text"]
    with pytest.raises(GdnfuseError, match="already fused"):
        convert(out, tmp_path / "again", workers=1)
    code, _, stderr = run(made["moe-text"][1], "--against", out)
    assert code == 2 and "not a Qwen3.5 model" in stderr
    assert not json.loads((out / "config.json").read_text())[RECORD_KEY]["arch"]["dropped_tensors"]


def test_gpu_check_is_skipped_not_misread(made: dict[str, tuple[Path, Path]]) -> None:
    """The GPU path reads both sides under one name: for qwen3_next outputs it says it skips."""
    from gdnfuse.verify import check_gpu

    src, out = made["dense-cg"]
    [result] = check_gpu(out, src, 1, "cuda")
    assert result.skipped and "qwen3_next" in result.detail
