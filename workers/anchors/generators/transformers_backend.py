"""Hugging Face transformers backend (CPU by default): batched, left padding, log-probs from the logits.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from runtime.anchor_settings import TransformersAnchors
from workers.anchors.generators.base import AnchorPrompt
from workers.anchors.generators.logprobs import Completion, completion_from_tokens
from workers.anchors.generators.prompt import (
    PREFILL,
    WORD_REPETITION_PENALTY,
    attempt_sampling,
    generation_budget,
    render_chat,
)
from workers.anchors.generators.retrying import RetryingGenerator

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------- transformers


class WordRepetitionPenalty:
    """Logits processor: make tokens with letters or digits that this answer already used less likely.

    transformers' own repetition penalty also counts the prompt (whose item titles are exactly what
    an anchor may reuse) and punctuation (which JSON must repeat); this one looks only at tokens
    generated after ``start`` and only at ``word_mask`` tokens. Same rule as the usual penalty:
    positive logits are divided by ``penalty``, negative ones multiplied.
    """

    def __init__(self, word_mask: Any, start: int, penalty: float) -> None:
        self.word_mask = word_mask  # bool tensor (vocab,)
        self.start = start
        self.penalty = penalty

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.start :]
        if generated.shape[1] == 0 or self.penalty == 1.0:
            return scores
        used = torch.zeros_like(scores, dtype=torch.bool)
        used.scatter_(1, generated, True)
        used &= self.word_mask[: scores.shape[1]]
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(used, penalised, scores)


class TransformersGenerator(RetryingGenerator):
    """Hugging Face transformers, batched, greedy by default; CPU unless ``device`` says otherwise.

    Batches are padded on the LEFT: a decoder-only model continues from the last position, so every
    row's prompt must end at the same index. Log-probs come from the *raw* logits
    (``output_logits=True``) through a log-softmax, not from the processed scores: a sampled retry
    warps the scores by its temperature, and we want the model's own probability of the text in both
    cases.

    ``threads`` sets torch's intra-op thread count for the process (None leaves it alone). On small
    shared CPUs one thread is often faster for a 135M model: OpenMP workers spin-wait on a core that
    another process holds.

    Prefix cache (``prefix_cache``): every prompt starts with the same chat template and system
    message, so their keys and values are computed once (the tokens two different probe prompts
    share) and reused: each call copies that cache, repeats it over the batch, and the model reads
    only each row's own part. Rows are then padded in the *middle* (shared prefix, pads, own part)
    instead of on the left; the pads are masked and positions follow the attention mask, so every
    row sees the positions and tokens it sees without the cache (greedy outputs are the same).
    """

    def __init__(self, model_dir: Path | str, settings: TransformersAnchors, *, device: str = "cpu",
                 threads: int | None = None, prefix_cache: bool | None = None) -> None:
        super().__init__(settings, "transformers")
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads is not None:
            torch.set_num_threads(threads)
        self._torch = torch
        self.model = settings.model_name
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        auto_lm: Any = AutoModelForCausalLM  # its stubs type from_pretrained oddly; the call is standard
        self.lm: Any = auto_lm.from_pretrained(str(model_dir))
        self.lm.to(device)
        self.lm.eval()
        eos = self.lm.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self._stop_ids = {int(e) for e in [*eos_ids, self.tokenizer.eos_token_id] if e is not None}
        self._word_mask = self._word_tokens(int(self.lm.config.vocab_size))
        self.prefix_cache = settings.prefix_cache if prefix_cache is None else prefix_cache
        self._prefix: tuple[list[int], Any] | None = None  # shared prompt tokens and their KV cache

    def _word_tokens(self, vocab_size: int) -> Any:
        """Bool mask over the vocabulary: tokens whose text holds a letter or digit (0.1 s, once)."""
        torch = self._torch
        mask = torch.zeros(max(vocab_size, len(self.tokenizer)), dtype=torch.bool)
        pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        for i, piece in enumerate(pieces):
            if piece and any(ch.isalnum() for ch in self.tokenizer.convert_tokens_to_string([piece])):
                mask[i] = True
        return mask.to(self.device)

    def render(self, prompt: AnchorPrompt) -> str:
        """The exact text fed to the model: chat template with the generation prompt, then the pre-fill."""
        return render_chat(self.tokenizer, prompt)

    def shared_prefix(self) -> tuple[list[int], Any]:
        """The tokens every prompt starts with and their KV cache (computed once; empty if too short)."""
        if self._prefix is None:
            a, b = (self._tokens(self.render(p)) for p in (AnchorPrompt("a", ["x"], 1),
                                                            AnchorPrompt("b", ["Yy zz", "w"], 3)))
            n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            cache = None
            if n >= 8:
                with self._torch.inference_mode():
                    ids = self._torch.tensor([a[:n]], device=self.device)
                    cache = self.lm(input_ids=ids, use_cache=True).past_key_values
            self._prefix = (a[:n] if cache is not None else [], cache)
        return self._prefix

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _inputs(self, texts: list[str]) -> tuple[dict[str, Any], Any]:
        """Model inputs for a batch, and the prefix cache to start from (None: no shared prefix)."""
        torch = self._torch
        prefix, cache = self.shared_prefix() if self.prefix_cache else ([], None)
        rows = [self._tokens(t) for t in texts]
        n = len(prefix)
        if cache is None or not all(len(r) > n and r[:n] == prefix for r in rows):
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            return dict(enc), None
        width = max(len(r) - n for r in rows)
        pad = int(self.tokenizer.pad_token_id)
        ids = [prefix + [pad] * (width - len(r) + n) + r[n:] for r in rows]
        mask = [[1] * n + [0] * (width - len(r) + n) + [1] * (len(r) - n) for r in rows]
        past = copy.deepcopy(cache)  # generate() appends to it
        past.batch_repeat_interleave(len(rows))
        return {"input_ids": torch.tensor(ids, device=self.device),
                "attention_mask": torch.tensor(mask, device=self.device)}, past

    def complete(self, prompts: list[AnchorPrompt], attempt: int) -> list[Completion]:
        torch = self._torch
        enc, past = self._inputs([self.render(p) for p in prompts])
        budget = generation_budget(max(p.k for p in prompts), self.settings.max_new_tokens)
        temperature, seed = attempt_sampling(self.settings, attempt)
        kwargs: dict[str, Any] = {"max_new_tokens": budget, "return_dict_in_generate": True,
                                  "output_logits": True, "pad_token_id": self.tokenizer.pad_token_id}
        if past is not None:
            kwargs["past_key_values"] = past
        if temperature > 0:
            kwargs |= {"do_sample": True, "temperature": temperature, "top_p": 0.95, "top_k": 50}
        else:
            kwargs |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList(
            [WordRepetitionPenalty(self._word_mask, enc["input_ids"].shape[1], WORD_REPETITION_PENALTY)]
        )
        # fork_rng: the attempt's seed must not disturb (or depend on) anyone else's use of the global RNG
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.lm.generate(**enc, **kwargs)
        gen = out.sequences[:, enc["input_ids"].shape[1]:]
        steps = len(out.logits)
        logprobs = torch.zeros(gen.shape[0], steps)
        for t in range(steps):  # one step at a time: never a (batch, steps, vocab) tensor
            lsm = torch.log_softmax(out.logits[t].float(), dim=-1)
            logprobs[:, t] = lsm.gather(1, gen[:, t : t + 1]).squeeze(1).cpu()
        return [self._completion(gen[r].tolist(), logprobs[r].tolist()) for r in range(gen.shape[0])]

    def _completion(self, ids: list[int], lps: list[float]) -> Completion:
        return completion_from_tokens(ids, lps, self._decode, self._stop_ids, PREFILL)

    def _decode(self, ids: list[int]) -> str:
        # no clean-up: it is meant for WordPiece and would move characters of a byte-level BPE text
        return str(self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
