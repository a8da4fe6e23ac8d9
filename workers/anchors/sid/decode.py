"""Incremental decoding of :class:`~workers.anchors.sid.sequence_model.SIDTransformer`: read a context once,
extend beams.

Why: a beam search step over W beams of a user would otherwise run the whole context (up to
``max_len`` tokens) through the model W times per step, although every beam of a user shares it. Here
the contexts go through the model once (:func:`prefill`), which keeps each layer's keys and values; a
step then runs only each beam's newest code, which attends to the user's cached context keys (not
copied per beam) and to the keys of the beam's earlier codes, kept per beam and reordered when the
beams are chosen (:func:`extend`, :func:`reorder`). Same weights, same arithmetic as ``SIDTransformer.forward``
(pre-norm layers, eval mode, no dropout): the logits agree with ``last_logits`` to float rounding
(tests/unit/workers/test_vector_anchors.py checks it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from workers.anchors.sid.sequence_model import PAD, SIDTransformer

Past = list[tuple[torch.Tensor, torch.Tensor]]  # per layer keys, values (U, W, heads, d, head_dim) of beam codes


@dataclass
class ContextCache:
    """Per layer the keys and values (U, heads, T, head_dim) of U right-padded contexts, and their lengths."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    lengths: torch.Tensor  # (U,) int64
    valid: torch.Tensor  # (U, T) bool: position < length


def _layers(model: SIDTransformer) -> list[nn.TransformerEncoderLayer]:
    layers = list(model.blocks.layers)
    for layer in layers:
        if not isinstance(layer, nn.TransformerEncoderLayer) or not layer.norm_first:
            raise TypeError("incremental decoding expects pre-norm nn.TransformerEncoderLayer blocks")
    return layers


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., T, D) -> (..., heads, T, D / heads)."""
    *lead, n, d = t.shape
    return t.reshape(*lead, n, heads, d // heads).transpose(-3, -2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    """(..., heads, T, head_dim) -> (..., T, D)."""
    t = t.transpose(-3, -2)
    return t.reshape(*t.shape[:-2], t.shape[-2] * t.shape[-1])


def _qkv(layer: nn.TransformerEncoderLayer, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    attn = layer.self_attn
    return tuple(_heads(t, attn.num_heads) for t in F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))


def _feed_forward(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    return x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))


def _level_logits(model: SIDTransformer, h: torch.Tensor, level: int) -> torch.Tensor:
    """Logits of one level's codes only: the head's rows of that slice (the rest would be masked anyway)."""
    off, size = model.config.offsets[level], model.config.level_sizes[level]
    return F.linear(model.norm(h), model.head.weight[off : off + size], model.head.bias[off : off + size])


@torch.no_grad()
def prefill(model: SIDTransformer, contexts: list[list[int]]) -> tuple[ContextCache, torch.Tensor]:
    """Run the contexts once: their cache and the level-0 logits (U, level_sizes[0]) after each context.

    Every context must end where a new item starts (BOS, then whole items), as the beam search needs.
    """
    cfg = model.config
    lengths = torch.tensor([len(c) for c in contexts], dtype=torch.long)
    t = int(lengths.max())
    if t > cfg.max_len:
        raise ValueError(f"context of {t} tokens exceeds max_len {cfg.max_len}")
    tokens = torch.full((len(contexts), t), PAD, dtype=torch.long)
    for i, c in enumerate(contexts):
        tokens[i, : len(c)] = torch.as_tensor(c, dtype=torch.long)
    x = model.tok(tokens) + model.pos(torch.arange(t))
    kv = []
    for layer in _layers(model):
        q, k, v = _qkv(layer, layer.norm1(x))
        # right padding is harmless under the causal mask: a real position never sees a later one
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + layer.self_attn.out_proj(_merge(a))
        x = _feed_forward(layer, x)
        kv.append((k, v))
    last = x[torch.arange(len(contexts)), lengths - 1]
    valid = torch.arange(t)[None, :] < lengths[:, None]
    return ContextCache(kv, lengths, valid), _level_logits(model, last, 0)


@torch.no_grad()
def extend(model: SIDTransformer, cache: ContextCache, codes: torch.Tensor, past: Past | None
           ) -> tuple[torch.Tensor, Past]:
    """Logits of the next level's codes (U, W, size) after each beam's prefix, and the beams' new past.

    ``codes`` (U, W): the newest code of each beam (level d - 1 of a d-code prefix), beam (u, w)
    continuing context u; ``past`` is what the previous call returned, already reordered to the
    current beams (:func:`reorder`), or None for the first code. Rows of empty beams may hold any code
    of the level (their logits are ignored by the caller).
    """
    cfg = model.config
    d = 1 if past is None else past[0][0].shape[-2] + 1
    pos = cache.lengths[:, None] + (d - 1)  # (U, 1)
    x = (model.tok(codes + cfg.offsets[d - 1]) + model.pos(pos))[:, :, None, :]  # (U, W, 1, D)
    scale = 1.0 / math.sqrt(cfg.d_model // cfg.heads)
    ctx_mask = torch.zeros(cache.valid.shape, dtype=x.dtype).masked_fill(~cache.valid, float("-inf"))
    ctx_mask = ctx_mask[:, None, None, None, :]  # (U, 1, 1, 1, T)
    t = cache.valid.shape[1]
    new_past: Past = []
    for i, (layer, (k_ctx, v_ctx)) in enumerate(zip(_layers(model), cache.kv, strict=True)):
        q, k, v = _qkv(layer, layer.norm1(x))  # (U, W, H, 1, hd)
        if past is not None:  # the beam's earlier codes: their keys and values do not change
            k, v = torch.cat([past[i][0], k], -2), torch.cat([past[i][1], v], -2)
        new_past.append((k, v))
        s_ctx = torch.einsum("uwhqe,uhte->uwhqt", q, k_ctx) * scale + ctx_mask
        s_own = q @ k.transpose(-1, -2) * scale  # the newest code sees itself and the earlier ones
        p = torch.softmax(torch.cat([s_ctx, s_own], -1), -1)
        a = torch.einsum("uwhqt,uhte->uwhqe", p[..., :t], v_ctx) + p[..., t:] @ v
        x = x + layer.self_attn.out_proj(_merge(a))
        x = _feed_forward(layer, x)
    return _level_logits(model, x[:, :, -1], d), new_past


def reorder(past: Past, beam: torch.Tensor) -> Past:
    """The past of the beams chosen at a step: ``beam`` (U, W') indexes the previous step's beams."""
    rows = torch.arange(beam.shape[0])[:, None]
    return [(k[rows, beam], v[rows, beam]) for k, v in past]
