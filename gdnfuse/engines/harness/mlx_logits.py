"""Full float32 logits from mlx-lm for token-id prompts, for each model given.

Run by :mod:`gdnfuse.engines.run` with the Python that has mlx-lm (``mlx[cpu]`` runs it on
Linux), so it imports nothing from gdnfuse. For each model: ``mlx_lm.utils.load_model``
(no tokenizer; strict: every weight must match a parameter in name and shape, which is how
mlx-lm refuses), cast every parameter to float32 (the CPU ``gather_mm`` of its MoE layers
takes float32 only, and float32 is what the comparison wants), run each prompt alone and
write the logits ``[len(prompt), vocab]`` to a safetensors file in ``--workdir``
(``prompt<i>``). mlx-lm's ``qwen3_5`` / ``qwen3_5_moe`` classes take the vision-language
checkpoints as released (they drop ``model.visual.*`` and ``mtp.*``); a model type mlx-lm
does not know is recorded with ``unknown_type``.
"""

import argparse
import json
import os


def run(model: str, index: int, prompts: list, workdir: str) -> dict:
    from pathlib import Path

    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_map
    from mlx_lm.utils import load_model

    print(f"GDNFUSE-BEGIN {model}", flush=True)
    res: dict = {"version": mlx_lm.__version__}
    try:
        loaded, _ = load_model(Path(model))
    except Exception as e:  # noqa: BLE001 (any load failure is mlx-lm refusing)
        why = f"{type(e).__name__}: {e}"
        res.update(refused=why, unknown_type="not supported" in why and "Model type" in why)
        return res
    loaded.update(tree_map(lambda x: x.astype(mx.float32), loaded.parameters()))
    loaded.eval()
    res["cls"] = f"{type(loaded).__module__}.{type(loaded).__name__}"
    logits = {}
    for i, ids in enumerate(prompts):
        out = loaded(mx.array([ids], dtype=mx.int32))
        logits[f"prompt{i}"] = out[0].astype(mx.float32)
    mx.eval(logits)
    name = f"logits{index}.safetensors"
    mx.save_safetensors(os.path.join(workdir, name), logits)
    res["file"] = name
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    prompts = json.loads(args.prompts)
    results = {m: run(m, i, prompts, args.workdir) for i, m in enumerate(args.models)}
    print("GDNFUSE-RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
