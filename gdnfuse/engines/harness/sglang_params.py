"""Load checkpoints with sglang's own loader on CPU, per TP rank; compare what they load.

Run by :mod:`gdnfuse.engines.run` with the engine's own Python: ``A B [B ...]``. With
``--tp N`` it starts N rank processes (gloo); each builds sglang's model for checkpoint A,
then for each B, exactly as sglang's ModelRunner does on CPU (publish the runtime context,
initialise the parallel groups, ModelConfig.from_server_args,
adjust_config_with_unaligned_cpu_tp, model_loader.get_model), and compares every parameter
*and buffer* of its rank (buffers: the rotary ``cos_sin_cache`` computed from the config's
RoPE base and rotary fraction, the ``gemma_weight`` norms sglang derives at load), so a
right checkpoint with a wrong config compares different. Equal parameters and buffers on
every rank mean an equal forward.

Names are sglang's own: its Qwen3.5 ConditionalGeneration classes keep the language model
under ``model.`` as its Qwen3-Next class does, and the vision tower under ``visual.``; what
only the source has there is counted (``source_only_vision``), as is the MRoPE axis map
(``source_only_mrope``), and not reported as a difference; anything else on one side only
is. The fused GDN input projections are compared in the order the model's own forward reads
them: each GDN module's ``fix_query_key_value_ordering`` (the function sglang's forward uses
to split ``in_proj_qkvz``/``in_proj_ba`` outputs into q, k, v, z, b, a) is applied to row
indices, and the rows are compared in that q, k, v, z / b, a order. For sglang's Qwen3.5
class that order is the identity; its Qwen3-Next class reads per-rank key-head groups, so a
Qwen3-Next checkpoint compares equal to its split Qwen3.5 source exactly when every row
means the same thing on every rank. Loading only: sglang's CPU forward needs sgl_kernel,
which has no CPU build on PyPI (import-time stand-ins for it must never be called; see
stubs/). A rank that dies inside sglang leaves a record of where (``a_refused`` when it was
loading A).

``--fp8-loader-only`` (opt-in; FP8 block-quantized checkpoints on a CPU without AMX):
sglang 0.5.23's CPU FP8 path asserts AMX support only in the quantization methods'
``process_weights_after_loading`` (srt/layers/quantization/fp8.py: Fp8LinearMethod's
``process_weights_after_loading_block_quant`` / ``process_weights_after_loading`` and
Fp8MoEMethod's ``process_weights_after_loading_block_quant``), which sglang's loader calls
after every weight is loaded, to repack the FP8 weights into AMX kernel tiles
(``_amx_process_weight_after_loading`` -> sgl_kernel's ``convert_weight_packed``, which has
no CPU build here). This flag replaces exactly those two ``process_weights_after_loading``
methods with one that leaves the parameters as loaded (and counts its calls:
``fp8_bypassed``). Everything the FP8 ignore-list rule is made of runs as sglang's own code
before that point: model construction, where ``Fp8Config.get_quant_method`` decides per
module with ``is_layer_skipped(prefix, ignored_layers, packed_modules_mapping)`` between
``UnquantizedLinearMethod`` and ``Fp8LinearMethod``, whose ``create_weights`` checks the
block sizes (``validate_block_quant_shapes`` raises for a quantized ``in_proj_ba``); then
``load_weights`` with the models' own weight loaders. The AMX capability flag itself is not
touched: it also selects loader paths (qwen3_next.py's packed loader pads on AMX CPUs).
What is compared is then the raw checkpoint data per rank: FP8 weights (bytes), their
``weight_scale_inv`` and the bf16 tensors; block scales of the fused GDN projections are
compared per row (each row's block scale, in the same forward-read order as the rows).
"""

import argparse
import json
import multiprocessing as mp
import os
import re
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


FP8_BYPASSED = [0]
"""Calls of the bypassed ``process_weights_after_loading`` (``--fp8-loader-only``)."""


def _fp8_loader_only() -> None:
    """Keep FP8 parameters as sglang loaded them: skip only the AMX weight repacking (see
    the module docstring). Construction, ignore-list matching and loading stay sglang's."""
    from sglang.srt.layers.quantization import fp8

    def keep_as_loaded(self, layer) -> None:  # noqa: ANN001
        FP8_BYPASSED[0] += 1

    fp8.Fp8LinearMethod.process_weights_after_loading = keep_as_loaded
    fp8.Fp8MoEMethod.process_weights_after_loading = keep_as_loaded


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


VISION = re.compile(r"^(?:model\.)?(?:visual|vision_tower|vision_model)\.")
"""Where sglang's ConditionalGeneration classes keep the vision tower (0.5.23: ``visual.``)."""
MROPE_ONLY = re.compile(r"\.rotary_emb\.axis_map$")
"""The interleaved-MRoPE frequency -> position-axis map (sglang's MRotaryEmbedding): a VL
source has it, a text-only model's plain RoPE does not. Text positions are equal on every
axis, so it selects nothing there: not a difference in what either model computes."""


def _state(model) -> dict:
    """Every parameter and buffer of ``model`` (rotary ``cos_sin_cache``, MRoPE ``axis_map``,
    the ``gemma_weight`` norms sglang derives at load), by sglang's name; fused GDN
    projections' rows in forward-read order."""
    import torch

    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    assert not set(out) & set(buffers), "a name is both a parameter and a buffer"
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
            scale = name + "_scale_inv"  # block FP8: each row's block scale, rows reordered
            if scale in out:
                s = out[scale]
                block = -(-w.shape[0] // s.shape[0])
                out[scale] = s.repeat_interleave(block, 0)[: w.shape[0]][order]
    return {"params": out, "buffers": buffers}


def _difference(x, y) -> str | None:
    import torch

    if x.shape != y.shape or x.dtype != y.dtype:
        return f"{list(x.shape)} {x.dtype} vs {list(y.shape)} {y.dtype}"
    if torch.equal(x, y):
        return None
    if x.dtype.is_floating_point and x.element_size() == 1:  # FP8: compare bytes
        return f"{int((x.view(torch.uint8) != y.view(torch.uint8)).sum())} bytes differ"
    d = (x.double() - y.double()).abs().max().item()
    return f"max abs difference {d:.3g}"


def compare(ref: dict, got: dict) -> dict:
    """``ref`` (the source) vs ``got``: counts, names on one side only, differences."""
    result: dict = {"params": len(ref["params"]), "buffers": len(ref["buffers"])}
    only_a, only_b, vision, mrope, diff = [], [], 0, [], {}
    for kind in ("params", "buffers"):
        a, b = ref[kind], got[kind]
        for name in sorted(set(a) - set(b)):
            if VISION.match(name):
                vision += 1
            elif kind == "buffers" and MROPE_ONLY.search(name):
                mrope.append(name)
            else:
                only_a.append(name)
        only_b += sorted(set(b) - set(a))
        for name in sorted(set(a) & set(b)):
            why = _difference(a[name], b[name])
            if why is not None:
                diff[name] = why
    result.update(only_a=only_a, only_b=only_b, source_only_vision=vision,
                  source_only_mrope=mrope, different=diff)  # fmt: skip
    result["compared"] = len((set(ref["params"]) & set(got["params"])) |
                             (set(ref["buffers"]) & set(got["buffers"])))  # fmt: skip
    return result


def rank_main(a: str, others: list, tp: int, rank: int, port: int, out: str,
              fp8_loader_only: bool = False) -> None:  # fmt: skip
    """Load ``a`` then each of ``others`` on this rank; write the comparisons to ``out``.

    ``out`` is rewritten after each step, so a rank that dies inside sglang (a crash, not an
    exception) leaves behind how far it got: dying while loading ``a`` is ``a_refused``.
    """
    _stand_in_ops()
    if fp8_loader_only:
        _fp8_loader_only()

    result: dict = {"rank": rank, "stage": "loading the source"}

    def save() -> None:
        with open(out + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(out + ".tmp", out)

    save()
    try:
        _init(tp, rank, port, a)
        FP8_BYPASSED[0] = 0
        ref = _state(_load(a, tp, rank))
    except Exception as e:  # noqa: BLE001
        result["a_refused"] = f"{type(e).__name__}: {e}"
        result.pop("stage")
        save()
        return
    result["params"] = len(ref["params"])
    if fp8_loader_only:
        result["fp8_bypassed"] = FP8_BYPASSED[0]
    result["results"] = []
    for b in others:
        result["stage"] = f"loading {b}"
        save()
        one: dict = {"rank": rank, "params": len(ref["params"])}
        try:
            FP8_BYPASSED[0] = 0
            got = _state(_load(b, tp, rank))
        except Exception as e:  # noqa: BLE001 (a load failure is sglang refusing B)
            one["refused"] = f"{type(e).__name__}: {e}"
        else:
            one.update(compare(ref, got))
            if fp8_loader_only:
                one["fp8_bypassed"] = FP8_BYPASSED[0]
            del got
        result["results"].append(one)
    result.pop("stage")
    save()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--fp8-loader-only", action="store_true",
                    help="keep FP8 weights as loaded: skip only the AMX repacking")  # fmt: skip
    ap.add_argument("a")
    ap.add_argument("others", nargs="+")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(args.tp):
        out = os.path.join(args.workdir, f"rank{rank}.json")
        p = ctx.Process(target=rank_main,
                        args=(args.a, args.others, args.tp, rank, args.port, out,
                              args.fp8_loader_only))  # fmt: skip
        p.start()
        procs.append((p, out))
    ranks = []
    for p, out in procs:
        p.join()
        try:
            with open(out) as f:
                got = json.load(f)
        except (OSError, ValueError):
            got = {"error": f"rank process exited with {p.exitcode} and no result"}
        if "stage" in got:  # died there
            why = f"rank process exited with {p.exitcode} while {got.pop('stage')}"
            if "results" not in got:
                got["a_refused"] = why
            else:
                got["results"].append({"rank": got["rank"], "refused": why})
                got["results"] += [{"rank": got["rank"], "error": why}] * (
                    len(args.others) - len(got["results"]))
        ranks.append(got)
    print("GDNFUSE-RESULT " + json.dumps(ranks), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
