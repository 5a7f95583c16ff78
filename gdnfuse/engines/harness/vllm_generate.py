"""Greedy-generate with vLLM from token-id prompts, for each model given; print JSON.

Run by :mod:`gdnfuse.engines.run` with the engine's own Python (the one vLLM is installed
in), so it imports nothing from gdnfuse. For each model: load it with
``skip_tokenizer_init`` (token ids in and out, no tokenizer needed), generate greedily,
and record the tokens and the top-k values (``--mode``: vLLM's ``logprobs_mode``;
``raw_logits`` gives the logits themselves) of every prompt position (``prompt_logprobs``,
teacher-forced: every position counts, not only the generated ones) and of every greedy
step; a model vLLM refuses to load, or fails to run, is recorded with the error instead.
The guard below is needed: vLLM spawns processes.

A vision-language checkpoint (config.json has a ``vision_config``: Qwen3.5 as released) is
served text only, with every modality limited to 0 items per prompt: vLLM then runs
"text-only mode" and builds no multimodal processor. Without the limits it refuses to start
without a tokenizer ("Qwen3VLMultiModalProcessor requires a tokenizer and cannot be
initialized when skip_tokenizer_init=True"). Generation ignores EOS, so that every prompt
is compared over all ``--max-tokens`` steps.
"""

import argparse
import json
import os

MODALITIES = ("image", "video")
"""The modalities of Qwen3.5's processor."""


def _multimodal(model: str) -> bool:
    with open(os.path.join(model, "config.json")) as f:
        return "vision_config" in json.load(f)


def _steps(steps) -> list:
    return [None if step is None else {str(t): lp.logprob for t, lp in step.items()}
            for step in steps]  # fmt: skip


def run(model: str, tp: int, prompts: list, max_tokens: int, top_k: int, mode: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    print(f"GDNFUSE-BEGIN {model}", flush=True)  # vLLM logs to stdout; its workers too
    kw = {}
    try:
        if _multimodal(model):
            kw["limit_mm_per_prompt"] = {m: 0 for m in MODALITIES}
        llm = LLM(model=model, tensor_parallel_size=tp, skip_tokenizer_init=True,
                  enforce_eager=True, max_model_len=128, dtype="bfloat16", seed=0,
                  logprobs_mode=mode, **kw)  # fmt: skip
    except Exception as e:  # noqa: BLE001 (any load failure is the engine refusing)
        return {"refused": f"{type(e).__name__}: {e}"}
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=top_k,
                                prompt_logprobs=top_k, detokenize=False,
                                ignore_eos=True)  # fmt: skip
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        return {
            "text_only": bool(kw),
            "mode": mode,
            "top_k": top_k,
            "outputs": [
                {
                    "tokens": list(o.outputs[0].token_ids),
                    "logprobs": _steps(o.outputs[0].logprobs),
                    "prompt_logprobs": _steps(o.prompt_logprobs or []),
                }
                for o in outs
            ],
        }
    except Exception as e:  # noqa: BLE001 (loaded, then failed to run: recorded, not raised)
        return {"refused": f"{type(e).__name__} while generating: {e}"}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--mode", default="raw_logprobs", help="vLLM's logprobs_mode")
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    prompts = json.loads(args.prompts)
    results = {m: run(m, args.tp, prompts, args.max_tokens, args.top_k, args.mode)
               for m in args.models}  # fmt: skip
    print("GDNFUSE-RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
