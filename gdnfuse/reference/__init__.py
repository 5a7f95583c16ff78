"""Plain-PyTorch reference forward of one GDN layer (split and fused), for equivalence tests."""

from gdnfuse.reference.naive import (
    GdnWeights,
    causal_conv_silu,
    fused_forward,
    gated_delta_rule,
    gated_rms_norm,
    gdn_core,
    l2norm,
    resplit,
    shard_weights,
    split_forward,
)

__all__ = [
    "GdnWeights",
    "causal_conv_silu",
    "fused_forward",
    "gated_delta_rule",
    "gated_rms_norm",
    "gdn_core",
    "l2norm",
    "resplit",
    "shard_weights",
    "split_forward",
]
