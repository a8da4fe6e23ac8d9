"""Deterministic ids: the same input always gives the same id, across processes and restarts."""

from __future__ import annotations

import hashlib

MASK63 = (1 << 63) - 1


def item_id_from_str(item: str) -> int:
    """Map a producer's string item id to the non-negative int64 the contracts use (blake2b, 63 bits)."""
    return int.from_bytes(hashlib.blake2b(item.encode(), digest_size=8).digest(), "big") & MASK63


def sample_id(request_id: str, item_id: int, anchor_version: int = 0) -> str:
    """Idempotency key of a sample: (request, item, anchor version). The trainer drops repeats."""
    return f"{request_id}:{item_id}:{anchor_version}"


def sample_id_affixes(request_id: str, anchor_version: int = 0) -> tuple[str, str]:
    """(head, tail) with ``sample_id(r, i, v) == f"{head}{i}{tail}"``: a batch's ids share both, so the
    labeler formats them once per request instead of once per sample."""
    return f"{request_id}:", f":{anchor_version}"
