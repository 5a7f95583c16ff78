"""Plain-PyTorch reference forward of one GDN layer (split and fused), for equivalence tests."""

from gdnfuse.reference.naive import (
    GdnWeights,
    causal_conv_silu,
    fused_forward,
    fused_heads,
    gated_delta_rule,
    gated_rms_norm,
    gdn_heads,
    l2norm,
    resplit,
    shard_weights,
    split_forward,
    split_heads,
)

__all__ = [
    "GdnWeights",
    "causal_conv_silu",
    "fused_forward",
    "fused_heads",
    "gated_delta_rule",
    "gated_rms_norm",
    "gdn_heads",
    "l2norm",
    "resplit",
    "shard_weights",
    "split_forward",
    "split_heads",
]
