"""Greedy-generate with vLLM from token-id prompts, for each model given; print JSON.

Run by :mod:`gdnfuse.engines.run` with the engine's own Python (the one vLLM is installed
in), so it imports nothing from gdnfuse. For each model: load it with
``skip_tokenizer_init`` (token ids in and out, no tokenizer needed), generate greedily,
and record the tokens and the top-k logprobs of every step; a model vLLM refuses to load
is recorded with the error instead. The guard below is needed: vLLM spawns processes.
"""

import argparse
import json


def run(model: str, tp: int, prompts: list, max_tokens: int, top_k: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    print(f"GDNFUSE-BEGIN {model}", flush=True)  # vLLM logs to stdout; its workers too
    try:
        llm = LLM(model=model, tensor_parallel_size=tp, skip_tokenizer_init=True,
                  enforce_eager=True, max_model_len=128, dtype="bfloat16", seed=0)  # fmt: skip
    except Exception as e:  # noqa: BLE001 (any load failure is the engine refusing)
        return {"refused": f"{type(e).__name__}: {e}"}
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=top_k,
                                detokenize=False)  # fmt: skip
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        return {
            "outputs": [
                {
                    "tokens": list(o.outputs[0].token_ids),
                    "logprobs": [
                        {str(t): lp.logprob for t, lp in step.items()}
                        for step in o.outputs[0].logprobs
                    ],
                }
                for o in outs
            ]
        }
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    prompts = json.loads(args.prompts)
    results = {m: run(m, args.tp, prompts, args.max_tokens, args.top_k) for m in args.models}
    print("GDNFUSE-RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
