"""Full float32 logits from transformers for token-id prompts, for each model given.

Run by :mod:`gdnfuse.engines.run` with the Python whose transformers is to be judged (4.x or
5.x), so it imports nothing from gdnfuse. For each model: load it with
``AutoModelForCausalLM`` in float32 (a Qwen3.5 vision-language checkpoint loads as its
language model: transformers 5.x maps ``qwen3_5`` / ``qwen3_5_moe`` to
``Qwen3_5(Moe)ForCausalLM``, which reads ``text_config`` and skips ``model.visual.*`` and
``mtp.*``), run each prompt alone from ``input_ids`` only (no mask, no positions: the
model's own defaults), and write the logits ``[len(prompt), vocab]`` to a safetensors file
in ``--workdir`` (``prompt<i>``). A model transformers refuses is recorded with the error;
``unknown_type`` says the refusal is this transformers not knowing the model type (4.x and
Qwen3.5), not a fault of the checkpoint.
"""

import argparse
import json
import os


def run(model: str, index: int, prompts: list, workdir: str) -> dict:
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    print(f"GDNFUSE-BEGIN {model}", flush=True)
    res: dict = {"version": transformers.__version__}
    try:
        AutoConfig.from_pretrained(model)
    except (ValueError, KeyError) as e:  # unknown model_type: this version does not know it
        res.update(refused=f"{type(e).__name__}: {e}", unknown_type=True)
        return res
    try:
        kw = {"dtype": torch.float32} if int(transformers.__version__.split(".")[0]) >= 5 else \
            {"torch_dtype": torch.float32}  # fmt: skip
        loaded, info = AutoModelForCausalLM.from_pretrained(model, output_loading_info=True, **kw)
    except Exception as e:  # noqa: BLE001 (any load failure is transformers refusing)
        why = f"{type(e).__name__}: {e}"
        res.update(refused=why, unknown_type="Unrecognized configuration class" in why)
        return res
    loaded.eval()
    res.update(cls=type(loaded).__name__,
               missing=sorted(info.get("missing_keys") or []),
               unexpected=sorted(info.get("unexpected_keys") or []),
               mismatched=[str(m[0]) if isinstance(m, tuple) else str(m)
                           for m in info.get("mismatched_keys") or []])  # fmt: skip
    logits = {}
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            out = loaded(input_ids=torch.tensor([ids], dtype=torch.long))
            logits[f"prompt{i}"] = out.logits[0].float().contiguous()
    name = f"logits{index}.safetensors"
    save_file(logits, os.path.join(workdir, name))
    res["file"] = name
    del loaded
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
