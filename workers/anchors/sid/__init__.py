"""Semantic-ID anchors (docs/design.md §2, the paper's own route), trained from scratch on CPU.

* :mod:`workers.anchors.sid.rqvae` — an RQ-VAE: every item vector gets a hierarchical semantic ID (3 residual
  codes), and any 3-level code decodes back into the frozen space; :mod:`workers.anchors.sid.tokenizer` — the
  trained model plus the catalogue's SID table (with a collision suffix), saved and loaded as one artifact.
* :mod:`workers.anchors.sid.generator` — a small causal transformer over users' positive SID sequences and a
  beam search constrained to the SIDs that exist; :class:`~workers.anchors.sid.generator.SIDAnchorGenerator`
  turns a history of item ids into K anchor vectors with their sequence log-probs.
* :mod:`workers.anchors.sid.evaluate` — the held-out next-item hit rate of SID anchors against the
  "K most recent positives" baseline.
"""
