"""Tiny random Qwen3.5 checkpoints saved by transformers itself, for end-to-end tests.

The converter must handle what ``save_pretrained`` really writes (key names, shard split,
index, ``__metadata__``, side files), so these checkpoints come from transformers' own
model classes rather than from :mod:`gdnfuse.synthetic`. Every parameter is redrawn from a
seeded generator with O(1)-scale values (transformers' init leaves norms at zero and the
router at zero, which would hide layout errors behind near-constant activations).

Public API: :class:`TinySpec`, :func:`build_model`, :func:`build_checkpoint`,
:func:`add_side_files`, :func:`add_mtp_layer`, :func:`gdn_prefixes`, :func:`load_spec`,
:func:`text_config_dict`, :func:`torch_threads`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import (
    PreTrainedModel,
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForCausalLM,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
)

from gdnfuse.layout import GdnDims

LAYER_TYPES = ("linear_attention", "linear_attention", "full_attention")
"""Two GDN layers then one full-attention layer (GDN layers need not be contiguous)."""

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
SIDE_FILES = {
    "tokenizer_config.json": json.dumps({"model_max_length": 64, "tokenizer_class": "Tiny"}),
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {}}}),
    "chat_template.jinja": CHAT_TEMPLATE,
    "README.md": "# tiny random Qwen3.5 for gdnfuse tests\n",
}
"""Side files a real checkpoint carries besides what ``save_pretrained`` writes."""


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny model. ``nk`` in {2, 4} lets tests pick ``tp`` with ``nk / tp > 1``."""

    r: int
    nk: int = 4
    dk: int = 8
    dv: int = 4
    hidden: int = 32
    moe: bool = False
    conditional: bool = False
    vocab: int = 96
    experts: int = 4
    mtp: bool = False
    """Add a GDN layer under ``mtp.layers.0.`` in its own shard (as :func:`add_mtp_layer`)."""

    @property
    def dims(self) -> GdnDims:
        return GdnDims(self.nk, self.nk * self.r, self.dk, self.dv)

    @property
    def layer_prefix(self) -> str:
        """Where decoder layers live in the saved checkpoint (docs/layouts.md section 5)."""
        return "model.language_model.layers." if self.conditional else "model.layers."


def text_config_dict(spec: TinySpec) -> dict[str, Any]:
    """Keyword arguments of the text config; also what a Qwen3-Next config must repeat."""
    kwargs: dict[str, Any] = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        linear_num_key_heads=spec.nk,
        linear_num_value_heads=spec.nk * spec.r,
        linear_key_head_dim=spec.dk,
        linear_value_head_dim=spec.dv,
        linear_conv_kernel_dim=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters={  # as released: base 1e7, a quarter of each head rotated, M-RoPE
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [1, 1, 0],
            "mrope_interleaved": True,
        },  # fmt: skip
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if spec.moe:
        kwargs.update(
            num_experts=spec.experts,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
        )
    else:
        kwargs.update(intermediate_size=48)
    return kwargs


def _vision_config(spec: TinySpec) -> dict[str, Any]:
    return dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=2,
        temporal_patch_size=2,
        spatial_merge_size=2,
        out_hidden_size=spec.hidden,
        num_position_embeddings=16,
    )


def _model_class_and_config(spec: TinySpec) -> tuple[type[PreTrainedModel], Any]:
    text = text_config_dict(spec)
    if spec.conditional:
        config_cls = Qwen3_5MoeConfig if spec.moe else Qwen3_5Config
        model_cls = (
            Qwen3_5MoeForConditionalGeneration if spec.moe else Qwen3_5ForConditionalGeneration
        )
        config = config_cls(text_config=text, vision_config=_vision_config(spec),
                            tie_word_embeddings=False)  # fmt: skip
        return model_cls, config
    config_cls = Qwen3_5MoeTextConfig if spec.moe else Qwen3_5TextConfig
    model_cls = Qwen3_5MoeForCausalLM if spec.moe else Qwen3_5ForCausalLM
    return model_cls, config_cls(**text)


def _redraw(model: PreTrainedModel, seed: int) -> None:
    """Fill every parameter with seeded O(1)-activation values, independent of dtype.

    Matrices get std ``1/sqrt(fan_in)``; vectors vary by 0.2 around their init value (so the
    zero-centered ``1 + w`` norms and the plain ``w`` GDN norm are neither the identity nor
    near zero); ``A_log`` stays in a range where the decay ``exp(-exp(A_log) * softplus(.))``
    neither vanishes nor saturates.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("A_log"):
                value = torch.empty(p.shape, dtype=torch.float64).uniform_(-1.0, 1.0, generator=gen)
            elif p.dim() >= 2:
                fan_in = p.shape[-1] if p.dim() <= 3 else p[0].numel()  # conv3d: in*t*p*p
                value = torch.randn(p.shape, generator=gen, dtype=torch.float64) * fan_in**-0.5
            else:  # around the init: 1 for plain-w norms and dt_bias, 0 for 1+w norms
                base = 1.0 if bool((p == 1).all()) else 0.0
                value = base + torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2
            p.copy_(value.to(p.dtype))


def build_model(spec: TinySpec, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """A tiny Qwen3.5 model in eval mode with seeded random weights."""
    model_cls, config = _model_class_and_config(spec)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    _redraw(model, seed)
    return model


def add_side_files(path: Path) -> dict[str, bytes]:
    """Write tokenizer files, a chat template and a README next to a checkpoint."""
    written = {}
    for name, text in SIDE_FILES.items():
        (path / name).write_text(text)
        written[name] = text.encode()
    return written


def build_checkpoint(
    path: str | Path,
    *,
    r: int,
    nk: int = 4,
    dk: int = 8,
    dv: int = 4,
    moe: bool = False,
    conditional: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shard_size: str | int = "40KB",
    side_files: bool = True,
    mtp: bool = False,
) -> Path:
    """Save a tiny random Qwen3.5 checkpoint with ``save_pretrained`` into ``path``.

    ``shard_size`` is passed as ``max_shard_size`` so that the checkpoint has several
    shards and GDN sources of one layer may land in different shards. With
    ``side_files`` the tokenizer files, chat template and README of :data:`SIDE_FILES`
    are added (``save_pretrained`` itself writes config.json and generation_config.json).
    With ``mtp`` a GDN layer is added under ``mtp.`` (:func:`add_mtp_layer`).
    A ``tiny_spec.json`` records the spec for tests that reopen the directory.
    """
    spec = TinySpec(r=r, nk=nk, dk=dk, dv=dv, moe=moe, conditional=conditional, mtp=mtp)
    path = Path(path)
    model = build_model(spec, dtype=dtype, seed=seed)
    model.save_pretrained(path, max_shard_size=shard_size)
    if mtp:
        add_mtp_layer(path, spec, dtype=dtype, seed=seed + 1000)
    if side_files:
        add_side_files(path)
    (path / "tiny_spec.json").write_text(json.dumps(asdict(spec)))
    return path


MTP_PREFIX = "mtp.layers.0.linear_attn."
MTP_SHARD = "model-mtp.safetensors"


def add_mtp_layer(path: Path, spec: TinySpec, *, dtype: torch.dtype, seed: int) -> None:
    """Add a GDN layer under ``mtp.`` in a shard of its own, and list it in the index.

    transformers neither builds nor loads ``mtp.*`` (released checkpoints carry it for the
    engines), so it is written here with the same shapes as a decoder GDN layer; the
    converter must fuse every layer that has the split projections, whatever its prefix.
    """
    donor = build_model(replace(spec, moe=False, conditional=False, mtp=False), seed=seed)
    layer = donor.model.layers[0].linear_attn
    tensors = {
        MTP_PREFIX + name: p.detach().to(dtype).contiguous()
        for name, p in layer.state_dict().items()
    }
    tensors["mtp.norm.weight"] = torch.ones(spec.hidden, dtype=dtype)
    add_shard(path, MTP_SHARD, tensors)


def add_shard(path: Path, shard: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as one more shard of the checkpoint in ``path`` and list it in the
    index (weight_map and total_size), as ``save_pretrained`` would have."""
    save_file(tensors, path / shard, metadata={"format": "pt"})
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({name: shard for name in tensors})
    index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in tensors.values())
    index_path.write_text(json.dumps(index, indent=2))


@contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run torch on ``n`` threads, then restore.

    Tiny float64 ops (depthwise conv1d above all) are up to 100x slower with two threads
    than with one on a loaded 2-core machine; the tests' tensors are far too small to gain.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_spec(path: str | Path) -> TinySpec:
    """The spec :func:`build_checkpoint` recorded in ``path``."""
    return TinySpec(**json.loads((Path(path) / "tiny_spec.json").read_text()))


def gdn_prefixes(spec: TinySpec) -> list[str]:
    """Key prefixes (ending in ``linear_attn.``) of the GDN layers the model has."""
    decoder = [
        f"{spec.layer_prefix}{i}.linear_attn."
        for i, kind in enumerate(LAYER_TYPES)
        if kind == "linear_attention"
    ]
    return decoder + [MTP_PREFIX] if spec.mtp else decoder
