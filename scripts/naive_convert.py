"""The baseline a user would write: load each shard with safetensors, fuse with torch, save.

Only for the benchmark (scripts/bench.py): it loads whole shards into memory and re-encodes
every tensor, which is what gdnfuse's byte-range streaming avoids. qwen3-next layout, tp 1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def fuse(qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor, cfg: dict):
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv, r = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], nv // nk
    q, k, v = torch.split(qkv, [nk * dk, nk * dk, nv * dv])
    h = qkv.shape[1]
    qkvz = torch.cat(
        [q.view(nk, dk, h), k.view(nk, dk, h), v.view(nk, r * dv, h), z.view(nk, r * dv, h)], 1
    ).reshape(-1, h)
    ba = torch.cat([b.view(nk, r, h), a.view(nk, r, h)], 1).reshape(-1, h)
    return qkvz, ba


def main(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    cfg = config.get("text_config", config)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / shard)
        out = {}
        for name, t in tensors.items():
            if ".linear_attn.in_proj_" in name:
                prefix, part = name.split(".linear_attn.in_proj_")
                parts = pending.setdefault(prefix, {})
                parts[part.split(".")[0]] = t
                if len(parts) == 4:
                    qkvz, ba = fuse(parts["qkv"], parts["z"], parts["b"], parts["a"], cfg)
                    out[f"{prefix}.linear_attn.in_proj_qkvz.weight"] = qkvz
                    out[f"{prefix}.linear_attn.in_proj_ba.weight"] = ba
                    del pending[prefix]
            else:
                out[name] = t
        save_file(out, dst / shard, metadata={"format": "pt"})
        for name in out:
            index["weight_map"][name] = shard
    for name in list(index["weight_map"]):
        if any(f".in_proj_{p}." in name for p in ("qkv", "z", "b", "a")):
            del index["weight_map"][name]
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        description="The naive baseline the benchmarks compare gdnfuse with: load each shard "
        "with torch, reshape/concatenate the GDN projections, save_file. Not for real use."
    )
    ap.add_argument("src", type=Path, help="split Qwen3.5 checkpoint directory")
    ap.add_argument("dst", type=Path, help="output directory (must not exist)")
    args = ap.parse_args()
    main(args.src, args.dst)
