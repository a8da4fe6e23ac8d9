"""The labeler's decoder of UnexposedBatch now lives beside the contract, in ``schemas/fast_codec.py``
(one home for the rules the streams stage's encoder and the labeler's decoder must agree on); this name
stays for the imports that still use it (the labeler's loop and the bench)."""

from schemas.fast_codec import Unexposed as Unexposed
from schemas.fast_codec import decode_unexposed as decode_unexposed
