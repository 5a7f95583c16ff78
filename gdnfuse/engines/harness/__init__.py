"""Scripts run by an engine's own Python (vLLM, sglang), not imported by gdnfuse."""
