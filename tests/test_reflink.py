"""Reflink-aware output (issue 15) on real, loop-mounted XFS (reflink=1) and btrfs.

A checkpoint saved by transformers (safetensors' own writer: names sorted, offsets not
block-aligned) is converted onto each filesystem and onto the default one (ext4 here):
the tensors must be byte-identical to the ext4 conversion, the official safetensors reader
and transformers must load the output, and the new blocks allocated must stay within what
the plan says cannot be cloned (headers, unaligned heads and tails). CI runs as root, and
scripts/test.sh installs xfsprogs and btrfs-progs, so these run there; elsewhere they skip
saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_models import build
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from gdnfuse.convert import convert, plan_source
from gdnfuse.plan import clonable_bytes
from gdnfuse.safetensors_file import read_header
from gdnfuse.verify import verify

MKFS = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q"]}


@pytest.fixture(scope="module", params=["xfs", "btrfs"])
def cow(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A mounted copy-on-write filesystem (1 GiB image file, loop device)."""
    kind = request.param
    if shutil.which(MKFS[kind][0]) is None:
        pytest.skip(f"{MKFS[kind][0]} is not installed (scripts/test.sh installs it)")
    root = tmp_path_factory.mktemp(kind)
    image, point = root / "fs.img", root / "mnt"
    point.mkdir()
    subprocess.run(["truncate", "-s", "1G", image], check=True)
    subprocess.run([*MKFS[kind], image], check=True, capture_output=True)
    proc = subprocess.run(["mount", "-o", "loop", image, point], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot loop-mount {kind} here (needs root): {proc.stderr.strip()}")
    yield point
    subprocess.run(["umount", point], check=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Heads of 64 x 256 bf16 = 32 KiB: every run of rows is whole 4 KiB blocks."""
    return build(tmp_path_factory.mktemp("src") / "src", moe=True, r=2)


def _tensors(root: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted(root.glob("*.safetensors")):
        header = read_header(shard)
        with open(shard, "rb") as f:
            for t in header.tensors:
                f.seek(header.data_start + t.begin)
                out[t.name] = f.read(t.nbytes)
    return out


def read_header_bytes(prefix: bytes) -> dict:
    """The header's JSON, padding aside."""
    import json

    n = int.from_bytes(prefix[:8], "little")
    return json.loads(prefix[8 : 8 + n])


def _used(path: Path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_clones_on_cow_filesystems_with_ext4_bytes(cow: Path, model: Path, tmp_path: Path) -> None:
    src = Path(shutil.copytree(model, cow / "src"))
    ext4 = convert(src, tmp_path / "ext4", engine="transformers").out
    before = _used(cow)
    result = convert(src, cow / "out", engine="transformers")
    allocated = _used(cow) - before
    out = result.out
    assert _tensors(out) == _tensors(ext4)  # only header padding may differ
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:  # the official reader
            for name in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                f.get_tensor(name)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    ref = AutoModelForCausalLM.from_pretrained(ext4, dtype=torch.float32)(ids).logits
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert torch.equal(ref, got)
    assert verify(out, against=src, numeric=False)
    plan = result.plan
    total, clonable = plan.plan.total_bytes, plan.bytes_clonable
    assert clonable > 0.9 * total, (clonable, total)
    # New blocks: at most what cannot be cloned, plus per-file slack (metadata, partial blocks).
    bound = (total - clonable) + 64 * 1024 * len(plan.plan.files)
    assert allocated <= bound, (allocated, bound, total)
    assert allocated < 0.25 * total  # a plain copy would allocate all of it


def test_header_padding_only_where_it_helps(model: Path, tmp_path: Path) -> None:
    """Released-like shapes get padded headers (data phase = the source's); the output stays
    a valid safetensors file either way, and tiny odd shapes keep today's layout."""
    cplan = plan_source(model)
    for f in cplan.plan.files:
        if f.name in cplan.rewritten:
            src = read_header(model / f.name)
            assert len(f.prefix) % 4096 == src.data_start % 4096, f.name
            assert clonable_bytes(f, 4096) > 0
    from gdnfuse.synthetic import write_checkpoint

    tiny = write_checkpoint(tmp_path / "tiny", "tiny", sort=True)  # heads of 2 KiB
    plain, padded = plan_source(tiny, block=None), plan_source(tiny)
    for a, b in zip(plain.plan.files, padded.plan.files, strict=True):
        assert a.extents == b.extents  # the same bytes from the same places
        if a.prefix != b.prefix:  # padded only where it makes more blocks cloneable
            assert clonable_bytes(b, 4096) > clonable_bytes(a, 4096), a.name
            assert read_header_bytes(b.prefix) == read_header_bytes(a.prefix)


def test_resume_and_overwrite_keep_working_on_cow(cow: Path, model: Path) -> None:
    src = cow / "src2"
    if not src.exists():
        shutil.copytree(model, src)
    out = convert(src, cow / "o2", workers=1, checksum=True).out
    convert(src, out, overwrite=True, link=True)
    assert verify(out, against=src, numeric=False)
