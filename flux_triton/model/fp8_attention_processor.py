"""diffusers' ``FluxAttnProcessor`` (0.42.1) with its attention kernel swapped: ``fp8_sdpa`` (``model.fp8_attention``)
in place of ``dispatch_attention_fn``; the projections, q/k norms, text-then-image concatenation, RoPE and output
projections are diffusers' own code path, step for step.

The kernel is the processor's ``attention`` argument, any function with ``F.scaled_dot_product_attention``'s
``(query, key, value)`` -> output in the (batch, heads, seq, head_dim) layout. That is the seam the tests use: with
plain SDPA the processor computes bitwise what diffusers' processor computes with its native backend.

Context parallelism is not supported: diffusers' hooks split attention inside ``dispatch_attention_fn``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, _get_qkv_projections

from flux_triton.model.fp8_attention import fp8_sdpa, require_fp8_attention, require_frontend

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class FluxFp8AttnProcessor:
    """``FluxAttnProcessor`` computing attention with ``attention`` (default ``fp8_sdpa``) instead of diffusers'
    dispatcher; no attention mask, no context parallelism."""

    _attention_backend = None  # set (and ignored) by diffusers' set_attention_backend
    _parallel_config = None  # set by diffusers' enable_parallelism, which this processor refuses

    def __init__(self, attention: Attention = fp8_sdpa):
        self.attention = attention

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("FluxFp8AttnProcessor: attention masks are not supported")
        if self._parallel_config is not None:
            raise ValueError("FluxFp8AttnProcessor: context parallelism goes through diffusers' dispatch_attention_fn")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # (batch, seq, heads, head_dim) <-> (batch, heads, seq, head_dim), as diffusers' native backend permutes
        hidden_states = self.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        text_tokens = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_tokens, hidden_states.shape[1] - text_tokens], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def set_attention(transformer: torch.nn.Module, attention: Attention) -> int:
    """Give every ``FluxAttention`` of ``transformer`` a ``FluxFp8AttnProcessor`` over ``attention``; returns how
    many. Only diffusers' default processor is replaced (an IP-adapter one would lose its adapter)."""
    modules = [module for module in transformer.modules() if isinstance(module, FluxAttention)]
    for module in modules:
        if not isinstance(module.processor, FluxAttnProcessor | FluxFp8AttnProcessor):
            raise ValueError(f"FP8 attention replaces FluxAttnProcessor, not {type(module.processor).__name__}")
    for module in modules:
        module.set_processor(FluxFp8AttnProcessor(attention))
    return len(modules)


def use_fp8_attention(transformer: torch.nn.Module, context_parallel: bool = False) -> int:
    """FP8 cuDNN attention (``fp8_sdpa``) in every attention module of ``transformer`` (on a Hopper or newer GPU,
    with ``nvidia-cudnn-frontend`` installed: both checked here); returns how many modules. Refused with
    ``context_parallel``: diffusers' context-parallel hooks split attention inside its dispatcher."""
    if context_parallel:
        raise ValueError("attention_backend fp8_cudnn: context parallelism splits attention inside diffusers' "
                         "dispatch_attention_fn, which FP8 attention bypasses; use _native_cudnn with it")  # fmt: skip
    require_fp8_attention(transformer.device)
    require_frontend()
    return set_attention(transformer, fp8_sdpa)


def use_diffusers_attention(transformer: torch.nn.Module) -> None:
    """Put diffusers' ``FluxAttnProcessor`` back where ``set_attention`` replaced it."""
    for module in transformer.modules():
        if isinstance(module, FluxAttention) and isinstance(module.processor, FluxFp8AttnProcessor):
            module.set_processor(FluxAttnProcessor())
