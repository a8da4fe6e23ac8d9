"""The SID sequence model: a small causal transformer over users' positive semantic-ID sequences.

Trained on positives with popular items downsampled (:func:`keep_probability`), saved with its config,
its tokenizer's hash and its own state hash, so a generator is never paired with another tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from workers.anchors.sid.artifact import read_artifact, write_artifact
from workers.anchors.sid.rqvae import warmup_cosine
from workers.anchors.sid.tokenizer import SIDTokenizer

FORMAT = "gpl-sid-generator/1"
GENERATOR_FILE = "generator.pt"
PAD, BOS = 0, 1
N_SPECIAL = 2
IGNORE = -100


@dataclass(frozen=True)
class GeneratorConfig:
    """Vocabulary layout (``level_sizes`` per SID position) and the transformer's shape."""

    level_sizes: tuple[int, ...]
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ff: int = 256
    dropout: float = 0.1
    context_items: int = 20  # items in a training window; inference reads the last context_items - 1
    seed: int = 0

    @property
    def depth(self) -> int:
        return len(self.level_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], N_SPECIAL
        for s in self.level_sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    @property
    def vocab(self) -> int:
        return N_SPECIAL + sum(self.level_sizes)

    @property
    def max_len(self) -> int:
        return 1 + self.depth * self.context_items


class SIDTransformer(nn.Module):
    """Decoder-only transformer (pre-norm, causal) whose logits are masked to the next level's slice."""

    level_mask: torch.Tensor

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab, config.d_model, padding_idx=PAD)
        self.pos = nn.Embedding(config.max_len, config.d_model)
        layer = nn.TransformerEncoderLayer(config.d_model, config.heads, config.ff, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab)
        # position p predicts the token at p + 1, whose level is p % depth (position 0 is BOS)
        mask = torch.full((config.max_len, config.vocab), float("-inf"))
        for p in range(config.max_len):
            level = p % config.depth
            lo = config.offsets[level]
            mask[p, lo : lo + config.level_sizes[level]] = 0.0
        self.register_buffer("level_mask", mask, persistent=False)

    def _hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_len {self.config.max_len}")
        h = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        return self.norm(self.blocks(h, mask=causal, is_causal=True))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T), T <= max_len; -inf outside the next level's slice."""
        return self.head(self._hidden(tokens)) + self.level_mask[: tokens.shape[1]]

    def last_logits(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) at each row's last real position of right-padded ``tokens``.

        Right padding is harmless under the causal mask (a position never attends to later ones), and
        the head runs on B positions instead of B x T: decoding never builds a (B, T, vocab) tensor.
        """
        h = self._hidden(tokens)[torch.arange(tokens.shape[0]), lengths - 1]
        return self.head(h) + self.level_mask[lengths - 1]


def item_tokens(sids: np.ndarray, config: GeneratorConfig) -> np.ndarray:
    """SIDs (n, depth) -> flat vocabulary tokens (n, depth)."""
    return sids.astype(np.int64) + np.asarray(config.offsets, np.int64)


def keep_probability(counts: np.ndarray, t: float) -> np.ndarray:
    """Per-item probability of keeping an occurrence as a target (module docstring); 1 when t <= 0."""
    counts = np.asarray(counts, np.float64)
    if t <= 0 or counts.sum() == 0:
        return np.ones_like(counts)
    f = counts / counts.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(f > 0, t / f, np.inf)
        p = np.sqrt(r) + r
    return np.minimum(1.0, p)


def _windows(rows: list[np.ndarray], width: int, stride: int, rng: np.random.Generator
             ) -> list[tuple[np.ndarray, int, int]]:
    """(row indices of a user's items in the window, first target position, user index) per window."""
    out = []
    for u, seq in enumerate(rows):
        n = len(seq)
        if n == 0:
            continue
        ends = [n]
        e = n - int(rng.integers(1, stride + 1))
        while e > 0:
            ends.append(e)
            e -= stride
        ends.append(0)
        for j in range(len(ends) - 1):
            end, first_target = ends[j], ends[j + 1]
            start = max(0, end - width)
            out.append((seq[start:end], first_target - start, u))
    return out


def _batch(windows: list[tuple[np.ndarray, int, int]], tokens: np.ndarray, keep: np.ndarray, depth: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Input tokens and labels (IGNORE where no loss) for a list of windows, right-padded."""
    length = 1 + depth * max(len(w[0]) for w in windows)
    x = np.full((len(windows), length), PAD, np.int64)
    y = np.full((len(windows), length), IGNORE, np.int64)
    for b, (rows, first_target, _) in enumerate(windows):
        toks = tokens[rows].reshape(-1)
        x[b, 0] = BOS
        x[b, 1 : 1 + len(toks)] = toks
        lab = toks.reshape(len(rows), depth).copy()
        lab[:first_target] = IGNORE
        lab[~keep[rows]] = IGNORE
        y[b, : len(toks)] = lab.reshape(-1)  # position p predicts token p + 1
    return torch.from_numpy(x), torch.from_numpy(y)


def train_generator(
    tokenizer: SIDTokenizer,
    sequences: Sequence[Sequence[int]],
    *,
    config: GeneratorConfig | None = None,
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 3e-3,
    stride: int | None = None,
    subsample_t: float = 1e-3,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[SIDTransformer, dict[str, Any]]:
    """Teacher-forced training from scratch on item-id sequences (time order); unknown items are skipped.

    ``stride`` (default half the window): targets per window; the rest of the window is context.
    ``progress(epoch, stats)`` is called after every epoch.
    """
    cfg = config or GeneratorConfig(level_sizes=tokenizer.level_sizes)
    if cfg.level_sizes != tokenizer.level_sizes:
        raise ValueError(f"config level sizes {cfg.level_sizes} != tokenizer's {tokenizer.level_sizes}")
    stride = stride or max(1, cfg.context_items // 2)
    if not 1 <= stride <= cfg.context_items:
        raise ValueError("need 1 <= stride <= context_items")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tokens = item_tokens(tokenizer.sids, cfg)
    rows = []
    for seq in sequences:
        r = [tokenizer.row_of(i) for i in seq]
        rows.append(np.asarray([x for x in r if x is not None], np.int64))
    counts = np.bincount(np.concatenate(rows) if rows else np.zeros(0, np.int64), minlength=len(tokens))
    p_keep = keep_probability(counts, subsample_t)
    model = SIDTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    n_windows = len(_windows(rows, cfg.context_items, stride, np.random.default_rng(0)))
    total = max(1, epochs * math.ceil(max(n_windows, 1) / batch_size))
    sched = warmup_cosine(opt, total, 0.1)
    stats: dict[str, float] = {}
    kept_total = 0
    for epoch in range(epochs):
        model.train()
        keep = rng.random(len(tokens)) < p_keep  # per item per epoch: one draw covers its occurrences
        wins = _windows(rows, cfg.context_items, stride, rng)
        order = rng.permutation(len(wins))
        loss_sum, tok_sum = 0.0, 0
        for s in range(0, len(order), batch_size):
            x, y = _batch([wins[j] for j in order[s : s + batch_size]], tokens, keep, cfg.depth)
            n_tok = int((y != IGNORE).sum())
            if n_tok == 0:
                continue
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), y.reshape(-1), ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * n_tok
            tok_sum += n_tok
        kept_total += tok_sum
        stats = {"epoch": float(epoch + 1), "loss": loss_sum / max(tok_sum, 1),
                 "target_tokens": float(tok_sum)}
        if progress is not None:
            progress(epoch + 1, stats)
    model.eval()
    occurrences = float(counts.sum())
    history = {
        "epochs": epochs, "windows_per_epoch": n_windows, "final": stats,
        "subsample_t": subsample_t, "stride": stride,
        "expected_kept_fraction": float((counts * p_keep).sum() / occurrences) if occurrences else 1.0,
        "users": len(rows), "positives": int(occurrences),
    }
    return model, history



def _state_hash(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_generator(model: SIDTransformer, tokenizer: SIDTokenizer, out_dir: Path | str,
                   metrics: dict[str, Any] | None = None) -> Path:
    """``generator.pt`` (weights, config, the tokenizer fingerprint it was trained on), ``generator.json``."""
    cfg = asdict(model.config)
    blob = {"format": FORMAT, "config": cfg, "state_dict": model.state_dict(),
            "tokenizer": tokenizer.fingerprint, "encoder_id": tokenizer.encoder_id,
            "metrics_json": json.dumps(metrics or {})}
    summary = {"format": FORMAT, "config": cfg, "tokenizer": tokenizer.fingerprint,
               "encoder_id": tokenizer.encoder_id, "metrics": metrics or {}}
    return write_artifact(out_dir, GENERATOR_FILE, blob, summary)


def load_generator(path: Path | str, tokenizer: SIDTokenizer) -> tuple[SIDTransformer, dict[str, Any]]:
    """Load ``generator.pt``; refuses one trained on another tokenizer's SIDs (they would mean nothing)."""
    p, blob = read_artifact(path, GENERATOR_FILE, FORMAT)
    if blob["tokenizer"] != tokenizer.fingerprint:
        raise ValueError(f"{p} was trained on tokenizer {blob['tokenizer']}, not {tokenizer.fingerprint}: "
                         "retrain the generator after retraining the tokenizer")
    cfg = dict(blob["config"])
    cfg["level_sizes"] = tuple(cfg["level_sizes"])
    model = SIDTransformer(GeneratorConfig(**cfg))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, json.loads(blob["metrics_json"])
