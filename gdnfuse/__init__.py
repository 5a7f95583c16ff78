"""gdnfuse: fuse Qwen3.5 Gated DeltaNet projections offline, exactly, and verify the result."""

__version__ = "0.1.0"
