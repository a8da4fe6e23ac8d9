"""The fast codecs' wire output, pinned: the same batches encode to the same bytes as before they moved
beside the contract (``schemas/fast_codec.py``, issue 23 item 5), and every importer reads one codec.

The digest was taken from the encoders in their old homes (``streams/join.py``) over these exact
batches; a change here is a change of the wire format, which needs a schema version, not a new digest.
"""

from __future__ import annotations

import hashlib

import numpy as np

import streams.join
from schemas.codec import encode
from schemas.events import ExposureEvent
from schemas.fast_codec import decode_recall, decode_unexposed, encode_real_samples, encode_unexposed

DIGEST = "6a1982cc8bd60ede34df99cfb8b1c1ab2102d7a787582abf7362fa84fc49f8c4"


def test_wire_output_is_byte_identical_to_the_old_encoders() -> None:
    h = hashlib.sha256()
    rng = np.random.default_rng(7)
    for b in range(200):
        n = int(rng.integers(1, 400))
        ids = rng.integers(0, 2**40 if b % 3 == 0 else 2**31, n, dtype=np.int64)  # both packed widths
        scores = rng.random(n, dtype=np.float32) if b % 2 else None
        for version in (1, 2):
            raw = encode_unexposed(f"req-{b}", f"user-{b % 17}-ü", 1_700_000_000_000 + b, ids, scores, version=version)
            assert decode_unexposed(raw).item_ids.tolist() == ids.tolist()
            h.update(raw)
        items = [{"item_id": int(i), "position": p, "clicked": p % 3 == 0} for p, i in enumerate(ids[:20])]
        ev = ExposureEvent(request_id=f"req-{b}", user_id=f"u{b}", ts=1_700_000_000_000 + b, items=items)  # type: ignore[arg-type]
        h.update(encode_real_samples(ev))
        h.update(encode(ev))
    assert h.hexdigest() == DIGEST


def test_one_codec_whatever_the_import() -> None:
    """The stage modules' names are the codec in schemas, not copies that could drift apart."""
    assert streams.join.decode_recall is decode_recall and streams.join.encode_unexposed is encode_unexposed
    ids = np.array([5, 2**33], np.int64)
    assert decode_recall(b'{"request_id":"r","user_id":"u","ts":1,"item_ids":[5,8589934592]}', 10).item_ids.tolist() \
        == ids.tolist()
