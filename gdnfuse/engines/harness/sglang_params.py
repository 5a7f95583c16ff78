"""Load two checkpoints with sglang's own loader on CPU, per TP rank; compare parameters.

Run by :mod:`gdnfuse.engines.run` with the engine's own Python. With ``--tp N`` it starts N
rank processes (gloo); each builds sglang's model for checkpoint A and for checkpoint B
exactly as sglang's ModelRunner does on CPU (publish the runtime context, initialise the
parallel groups, ModelConfig.from_server_args, adjust_config_with_unaligned_cpu_tp,
model_loader.get_model) and compares every parameter of its rank. Equal parameters on every
rank mean an equal forward. The fused GDN input projections are compared in the order the
model's own forward reads them: each GDN module's ``fix_query_key_value_ordering`` (the
function sglang's forward uses to split ``in_proj_qkvz``/``in_proj_ba`` outputs into q, k, v,
z, b, a) is applied to row indices, and the rows are compared in that q, k, v, z / b, a
order. For sglang's Qwen3.5 class that order is the identity; its Qwen3-Next class reads
per-rank key-head groups, so a Qwen3-Next checkpoint compares equal to its split Qwen3.5
source exactly when every row means the same thing on every rank. Loading only: sglang's
CPU forward needs sgl_kernel, which has no CPU build on PyPI (import-time stand-ins for it
must never be called; see stubs/).
"""

import argparse
import json
import multiprocessing as mp
import os
import sys


def _stand_in_ops() -> None:
    """``torch.ops.sgl_kernel.*_cpu`` is read at import time by sglang's CPU paths."""
    import torch

    class Namespace:
        def __getattr__(self, attr: str):
            if attr.endswith("_cpu"):
                import sitecustomize  # the stand-ins on PYTHONPATH

                return sitecustomize._Stand(f"torch.ops.sgl_kernel.{attr}")
            raise AttributeError(attr)

    torch.ops.sgl_kernel = Namespace()


def _load(path: str, tp: int, rank: int):
    from sglang.srt.configs.device_config import DeviceConfig
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.configs.update_config import adjust_config_with_unaligned_cpu_tp
    from sglang.srt.model_loader import get_model
    from sglang.srt.runtime_context import SpawnRanks, publish, spawn_world_rank
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=path, tp_size=tp, device="cpu", dtype="bfloat16",
                      skip_tokenizer_init=True, disable_radix_cache=True)  # fmt: skip
    publish(args, role="scheduler",
            ranks=SpawnRanks(world_rank=spawn_world_rank(args, tp_rank=rank, pp_rank=0),
                             dp_rank=None, gpu_id=0))  # fmt: skip
    config = ModelConfig.from_server_args(args)
    load = LoadConfig()
    config = adjust_config_with_unaligned_cpu_tp(config, load, tp)
    return get_model(model_config=config, load_config=load, device_config=DeviceConfig("cpu"))


def _init(tp: int, rank: int, port: int, first: str) -> None:
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import SpawnRanks, publish, spawn_world_rank
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs(model_path=first, tp_size=tp, device="cpu", dtype="bfloat16",
                      skip_tokenizer_init=True, disable_radix_cache=True)  # fmt: skip
    publish(args, role="scheduler",
            ranks=SpawnRanks(world_rank=spawn_world_rank(args, tp_rank=rank, pp_rank=0),
                             dp_rank=None, gpu_id=0))  # fmt: skip
    parallel_state.init_distributed_environment(
        world_size=tp, rank=rank, local_rank=rank, backend="gloo",
        distributed_init_method=f"tcp://127.0.0.1:{port}",
    )  # fmt: skip
    parallel_state.initialize_model_parallel(backend="gloo")


def _row_order(module, rows_qkvz: int, rows_ba: int):
    """Row indices of in_proj_qkvz / in_proj_ba in the q, k, v, z / b, a order ``module``'s
    forward reads them (its own ``fix_query_key_value_ordering`` applied to indices)."""
    import torch

    qkvz = torch.arange(rows_qkvz, dtype=torch.float64).unsqueeze(0)
    ba = torch.arange(rows_ba, dtype=torch.float64).unsqueeze(0)
    parts = module.fix_query_key_value_ordering(qkvz, ba)
    return [torch.cat([p.reshape(-1) for p in group]).round().long()
            for group in (parts[:4], parts[4:])]  # fmt: skip


def _params(model) -> dict:
    """Every parameter of ``model``; fused GDN projections' rows in forward-read order."""
    import torch

    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    for prefix, module in model.named_modules():
        if not hasattr(module, "fix_query_key_value_ordering"):
            continue
        names = [f"{prefix}.in_proj_qkvz.weight", f"{prefix}.in_proj_ba.weight"]
        orders = _row_order(module, out[names[0]].shape[0], out[names[1]].shape[0])
        for name, order in zip(names, orders, strict=True):
            w = out[name]
            assert sorted(order.tolist()) == list(range(w.shape[0])), (name, "not a permutation")
            # by bytes, so that any dtype (FP8 too) moves rows without arithmetic
            out[name] = w.view(torch.uint8)[order].view(w.dtype)
    return out


def rank_main(a: str, b: str, tp: int, rank: int, port: int, out: str) -> None:
    _stand_in_ops()
    import torch

    result: dict = {"rank": rank}
    try:
        _init(tp, rank, port, a)
        ref = _params(_load(a, tp, rank))
    except Exception as e:  # noqa: BLE001
        result["a_refused"] = f"{type(e).__name__}: {e}"
        ref = None
    if ref is not None:
        result["params"] = len(ref)
        try:
            got = _params(_load(b, tp, rank))
        except Exception as e:  # noqa: BLE001 (a load failure is sglang refusing B)
            result["refused"] = f"{type(e).__name__}: {e}"
        else:
            result["only_a"] = sorted(set(ref) - set(got))
            result["only_b"] = sorted(set(got) - set(ref))
            diff = {}
            for name in sorted(set(ref) & set(got)):
                x, y = ref[name], got[name]
                if x.shape != y.shape or x.dtype != y.dtype:
                    diff[name] = f"{list(x.shape)} {x.dtype} vs {list(y.shape)} {y.dtype}"
                elif not torch.equal(x, y):
                    d = (x.float() - y.float()).abs().max().item()
                    diff[name] = f"max abs difference {d:.3g}"
            result["different"] = diff
    with open(out, "w") as f:
        json.dump(result, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("a")
    ap.add_argument("b")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(args.tp):
        out = os.path.join(args.workdir, f"rank{rank}.json")
        p = ctx.Process(target=rank_main, args=(args.a, args.b, args.tp, rank, args.port, out))
        p.start()
        procs.append((p, out))
    ranks = []
    for p, out in procs:
        p.join()
        try:
            with open(out) as f:
                ranks.append(json.load(f))
        except OSError:
            ranks.append({"error": f"rank process exited with {p.exitcode} and no result"})
    print("GDNFUSE-RESULT " + json.dumps(ranks), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
