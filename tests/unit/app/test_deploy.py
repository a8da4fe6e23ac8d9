"""The production stacks, checked offline: compose.yaml, Dockerfile, deploy/ (Kustomize + Prometheus).

No docker, no kustomize binary, no cluster:

- compose.yaml is validated against the Compose Specification JSON schema (vendored in
  tests/schemas/compose-spec.json) after the same interpolation Compose does, then checked for what
  the schema cannot know (stages, profiles, dependencies, healthchecks, pinned images).
- deploy/ overlays are rendered by a small Kustomize subset written here (resources, components,
  patches as strategic-merge patches with optional targets, namespace, images). It refuses any
  kustomization field it does not implement, so nothing is silently skipped. Built-in kinds are
  validated with the Kubernetes schemas bundled in `kubernetes-validate` (strict: unknown fields
  fail); custom resources (Strimzi, KEDA, ServiceMonitor) with small hand-written schemas in
  tests/schemas/crds/.
- every GPL_* variable in compose.yaml, the Dockerfile and deploy/ must name a field of
  runtime.settings.Settings (a section's field for GPL_<SECTION>__<FIELD>; for anchors, a field of any
  backend's model), and every container's full environment — the image's ENV included — must load
  through runtime.settings.load: a typo, or an option of another anchors backend, cannot be silently ignored.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from runtime.settings import Settings, load, section_fields
from schemas.topics import Naming, all_topic_names, app_id, by_name, configure

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parents[3] / "tests" / "schemas"
K8S_VERSION = "1.33"

STAGES = ("streams", "indexer", "anchors", "labeler", "trainer")
# consumer groups scaled by KEDA and the topics whose lag drives them
CONSUMED = {
    "streams": ("recall", "exposure"),
    "indexer": ("items",),
    "anchors": ("anchor-requests",),
    "labeler": ("unexposed",),
}
OVERLAYS = ("base", "overlays/dev", "overlays/prod", "overlays/prod-gpu-workers", "overlays/shared-cluster")

# Settings fields that deploy files already use but the settings model does not have yet. Allowed
# only while the field is missing; once it lands it is checked like every other name.
PENDING_FIELDS: dict[tuple[str, str], str] = {}  # (section, field) used by the stacks, not in settings yet
GPL_NAME = re.compile(r"\bGPL_[A-Z0-9_]+")
# what every stage's probes ask (runtime/health.py): /metrics would answer for a dead stage
PROBE_PATHS = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}


# --------------------------------------------------------------------------------------------------
# settings names and values


def _pending(section: str, field: str) -> bool:
    fields = section_fields(section)  # anchors: every backend's fields (one model per backend)
    return (section, field) in PENDING_FIELDS and fields is not None and field not in fields


def settings_name_problem(name: str) -> str | None:
    """Why ``name`` does not map to a settings field, or None when it does."""
    if name == "GPL_CONFIG":
        return None
    parts = name[len("GPL_") :].lower().split("__")
    top = parts[0]
    if top not in Settings.model_fields:
        return f"{name}: Settings has no field {top!r}"
    section = section_fields(top)
    if len(parts) == 1:
        return f"{name}: {top!r} is a section; use GPL_{top.upper()}__<FIELD>" if section else None
    if section is None:
        return f"{name}: {top!r} is not a section"
    if len(parts) > 2:
        return f"{name}: nested too deep"
    if parts[1] not in section and not _pending(top, parts[1]):
        return f"{name}: section {top!r} has no field {parts[1]!r}"
    return None


def load_env(env: dict[str, str], where: str) -> Settings:
    """Load a container's whole environment the way `gpl` does; pending fields are left out."""
    gpl = {}
    for k, v in env.items():
        if not k.startswith("GPL_"):
            continue
        problem = settings_name_problem(k)
        assert problem is None, f"{where}: {problem}"
        parts = k[len("GPL_") :].lower().split("__")
        if len(parts) == 2 and _pending(*parts):
            continue
        gpl[k] = str(v)
    try:
        return load(env=gpl)
    except Exception as e:  # pydantic's ValidationError or load()'s ValueError
        raise AssertionError(f"{where}: settings do not load: {e}") from e


def gpl_names_in(paths: Iterable[Path]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for p in paths:
        for name in GPL_NAME.findall(p.read_text()):
            found.setdefault(name, set()).add(str(p.relative_to(ROOT)))
    return found


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def test_every_gpl_variable_names_a_settings_field() -> None:
    names = gpl_names_in([COMPOSE, DOCKERFILE, *deploy_files()])
    assert len(names) > 10, "expected the stacks to configure the stages through GPL_* variables"
    problems = [
        f"{problem} (in {', '.join(sorted(names[n]))})"
        for n in sorted(names)
        if (problem := settings_name_problem(n))
    ]
    assert not problems, "\n".join(problems)


def test_name_check_catches_typos() -> None:
    assert settings_name_problem("GPL_KAFKA__BOOTSTRAP_SERVERS") is None
    assert settings_name_problem("GPL_METRICS_PORT") is None
    assert settings_name_problem("GPL_KAFKA__BOOTSTRAP_SERVER")  # nested typo
    assert settings_name_problem("GPL_KAFAK__PARTITIONS")  # section typo
    assert settings_name_problem("GPL_KAFKA")  # a section set flat
    assert settings_name_problem("GPL_METRICS_PORT__X")  # a scalar used as a section
    with pytest.raises(AssertionError):
        load_env({"GPL_ANCHORS__BACKEND": "gpt"}, "typo'd value")


def test_pending_settings_fields_have_landed() -> None:
    missing = [f"{s}.{f}" for (s, f) in PENDING_FIELDS if _pending(s, f)]
    assert not missing, f"not in runtime.settings yet: {missing}; drop them from PENDING_FIELDS once added"


# --------------------------------------------------------------------------------------------------
# compose.yaml

_INTERP = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (``$$``, ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``, ``$V``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("plain"):
            return env.get(m.group("plain"), "")
        expr = m.group("braced")
        mm = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?+])(.*))?", expr, re.S)
        assert mm, f"bad interpolation ${{{expr}}}"
        var, colon, op, arg = mm.groups()
        cur = env.get(var)
        unset = cur is None or (colon == ":" and cur == "")
        if op == "-":
            return arg if unset else cur  # type: ignore[return-value]
        if op == "?":
            assert not unset, f"required variable {var}: {arg}"
            return cur  # type: ignore[return-value]
        if op == "+":
            return "" if unset else arg
        return cur or ""

    return _INTERP.sub(one, value)


@pytest.fixture(scope="module")
def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # YAML merge keys (<<) are resolved here, as Compose does


@pytest.fixture(scope="module")
def compose(compose_raw: dict[str, Any]) -> dict[str, Any]:
    return interpolate(compose_raw, env={})


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_matches_the_compose_specification(compose, compose_validator) -> None:
    errors = _errors(compose_validator, compose)
    assert not errors, "\n".join(errors)


def test_compose_schema_is_strict_enough(compose, compose_validator) -> None:
    """The schema must reject the typos it is here to catch, or the test above proves nothing."""
    for mutate in (
        lambda d: d["services"]["streams"].__setitem__("restrat", "always"),
        lambda d: d["services"]["kafka"]["healthcheck"].__setitem__("intervall", "5s"),
        lambda d: d["services"]["streams"]["depends_on"]["topics"].__setitem__("condition", "service_done"),
        lambda d: d.__setitem__("servics", {}),
    ):
        doc = copy.deepcopy(compose)
        mutate(doc)
        assert _errors(compose_validator, doc), "a typo passed the Compose schema"


def _service_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _image_pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


def test_compose_services(compose) -> None:
    svcs = compose["services"]
    for name in ("kafka", "topics", "qdrant", "vllm", *STAGES, "anchors-gpu", "replay", "prometheus"):
        assert name in svcs, f"compose.yaml has no service {name!r}"
    # one service per stage, each running `gpl run --stages <stage>`
    for stage in STAGES:
        runners = [n for n, s in svcs.items() if s.get("command") == ["run", "--stages", stage]]
        assert runners, f"no service runs the {stage} stage"
    assert svcs["topics"]["command"] == ["topics", "create"]
    # profiles: vLLM + GPU anchors under gpu, CPU anchors under cpu, the demo replay under demo
    assert svcs["vllm"]["profiles"] == ["gpu"]
    assert svcs["anchors-gpu"]["profiles"] == ["gpu"]
    assert svcs["anchors"]["profiles"] == ["cpu"]
    assert svcs["replay"]["profiles"] == ["demo"]
    assert _service_env(svcs["anchors"])["GPL_ANCHORS__BACKEND"] == "transformers"
    gpu_env = _service_env(svcs["anchors-gpu"])
    assert gpu_env["GPL_ANCHORS__BACKEND"] == "openai"
    assert gpu_env["GPL_ANCHORS__BASE_URL"].startswith("http://vllm:")
    devices = svcs["vllm"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "demo" in " ".join(svcs["replay"]["command"]) and "replay" in " ".join(svcs["replay"]["command"])


def test_compose_images_are_pinned(compose) -> None:
    images = {n: s["image"] for n, s in compose["services"].items() if "image" in s}
    assert images["kafka"].startswith("apache/kafka:")
    assert images["qdrant"].startswith("qdrant/qdrant:v")
    for name, image in images.items():
        assert _image_pinned(image), f"{name}: image {image!r} is not pinned to a tag"


def test_compose_kafka_is_kraft_single_broker(compose) -> None:
    env = _service_env(compose["services"]["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(env["KAFKA_NODE_ID"] + "@")
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"]), "KRaft cluster id must be a base64 UUID"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= Settings().kafka.max_message_bytes
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]


def test_compose_dependencies_and_health(compose) -> None:
    svcs = compose["services"]
    for name, svc in svcs.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in svcs, f"{name} depends on unknown service {dep}"
            # a dependency must not need a profile that its dependent may run without
            assert set(svcs[dep].get("profiles", [])) <= set(svc.get("profiles", [])), (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in svcs[dep], (
                    f"{name} waits for {dep} to be healthy: {dep} has no healthcheck"
                )
            if cond["condition"] == "service_completed_successfully":
                assert svcs[dep].get("restart", "no") == "no", f"{dep} is a one-shot job"
    long_running = [n for n in svcs if n not in ("topics", "replay")]
    for name in long_running:
        assert svcs[name].get("restart") in ("unless-stopped", "always", "on-failure"), (
            f"{name}: no restart policy"
        )
        assert "healthcheck" in svcs[name], f"{name}: no healthcheck"
    for stage in (n for n, s in svcs.items() if (s.get("command") or [None])[0] == "run"):
        deps = svcs[stage]["depends_on"]
        assert deps["topics"]["condition"] == "service_completed_successfully", stage
        assert "9100" in " ".join(svcs[stage]["healthcheck"]["test"]), f"{stage}: probe the metrics port"
        # /metrics answers while a stage is dead; /healthz does not (runtime/health.py)
        assert "/healthz" in " ".join(svcs[stage]["healthcheck"]["test"]), f"{stage}: probe /healthz"
    assert svcs["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_compose_volumes(compose) -> None:
    svcs = compose["services"]

    def mounts(name: str) -> dict[str, str]:
        return {v.split(":")[1]: v.split(":")[0] for v in svcs[name].get("volumes", [])}

    assert mounts("qdrant")["/qdrant/storage"] in compose["volumes"]
    assert mounts("kafka")["/var/lib/kafka/data"] in compose["volumes"]
    assert mounts("trainer")["/data"] in compose["volumes"], "trainer checkpoints need a volume"
    prom = mounts("prometheus")["/etc/prometheus/prometheus.yml"]
    assert (ROOT / prom).resolve() == DEPLOY / "prometheus.yml"


def test_compose_stage_environments_load(compose) -> None:
    svcs = compose["services"]
    partitions = set()
    for name, svc in svcs.items():
        env = _service_env(svc)
        if not any(k.startswith("GPL_") for k in env):
            continue
        s = load_env(_image_env(svc["image"]) | env, f"compose service {name}")
        partitions.add(s.kafka.partitions)
        assert s.kafka.bootstrap_servers == "kafka:9092", name
        assert s.qdrant.url == "http://qdrant:6333", name
        assert s.metrics_port == 9100, name
    assert len(partitions) == 1, "every service must agree on GPL_KAFKA__PARTITIONS"
    kafka_env = _service_env(svcs["kafka"])
    assert int(kafka_env["KAFKA_NUM_PARTITIONS"]) == partitions.pop()


def test_compose_partitions_follow_the_host_variable(compose_raw) -> None:
    doc = interpolate(compose_raw, env={"PARTITIONS": "24"})
    s = load_env(_service_env(doc["services"]["labeler"]), "labeler with PARTITIONS=24")
    assert s.kafka.partitions == 24


def test_prometheus_scrapes_every_stage(compose) -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {
        t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]
    }
    svcs = compose["services"]
    for name, svc in svcs.items():
        if (svc.get("command") or [None])[0] == "run":
            assert f"{name}:9100" in targets, f"prometheus does not scrape {name}"
    for t in targets:
        host = t.split(":")[0]
        assert host in svcs or host == "localhost", f"prometheus target {t} is no compose service"


def _render_prometheus_rules(source: str) -> str:
    """deploy/prometheus_rules.py's render (run from its path: deploy/ is no package; no bytecode left there)."""
    import runpy

    return str(runpy.run_path(str(DEPLOY / "prometheus_rules.py"), run_name="prometheus_rules")["render"](source))


def test_one_host_prometheus_loads_the_alert_rules(compose, rendered) -> None:
    """The one-host Prometheus evaluates the cluster's alerts: prometheus.yml loads a rule file, compose mounts
    deploy/prometheus-rules.yml exactly there, and that file is the PrometheusRule's spec as generated now
    (`make prometheus-rules`), in the shape a plain Prometheus accepts."""
    from fnmatch import fnmatch

    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    loaded = prom.get("rule_files") or []
    assert loaded, "deploy/prometheus.yml loads no alert rules"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["prometheus"].get("volumes", [])}
    mounted = [(ROOT / mounts[dst]).resolve() for pattern in loaded for dst in mounts if fnmatch(dst, pattern)]
    assert mounted == [DEPLOY / "prometheus-rules.yml"], (loaded, mounts)
    text = (DEPLOY / "prometheus-rules.yml").read_text()
    generated = _render_prometheus_rules((DEPLOY / "base" / "alerts.yaml").read_text())
    assert text == generated, "deploy/prometheus-rules.yml differs from deploy/base/alerts.yaml: make prometheus-rules"
    groups = yaml.safe_load(text)["groups"]
    assert set(yaml.safe_load(text)) == {"groups"}
    for g in groups:  # Prometheus refuses a rule file with unknown keys
        assert set(g) <= {"name", "interval", "limit", "query_offset", "labels", "rules"} and g["rules"], g.get("name")
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, r
    assert [r["alert"] for g in groups for r in g["rules"]] == [r["alert"] for r in alert_rules(rendered)]
    # the target-down alert selects the job that scrapes the stages here too
    stage_job = next(j["job_name"] for j in prom["scrape_configs"]
                     if any("labeler:9100" in sc["targets"] for sc in j.get("static_configs", [])))
    selectors = [m for g in groups for r in g["rules"] for m in re.findall(r'job=~"([^"]+)"', r["expr"])]
    assert selectors and all(re.fullmatch(s, stage_job) for s in selectors), (selectors, stage_job)


# --------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for ins, args in dockerfile_instructions():
        if ins == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert m, f"FROM {args}"
            current = m.group(2) or f"stage{len(stages)}"
            stages[current] = [("FROM", m.group(1))]
        else:
            assert current is not None or ins == "ARG", f"{ins} before FROM"
            if current is not None:
                stages[current].append((ins, args))
    return stages


def _docker_env(args: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in re.findall(r"\S+=\S+", args))


def _stage_env(stages: dict[str, list[tuple[str, str]]], name: str) -> dict[str, str]:
    """ENV of a stage including the stages it is built FROM."""
    base = stages[name][0][1]
    env = _stage_env(stages, base) if base in stages else {}
    for ins, args in stages[name][1:]:
        if ins == "ENV":
            env.update(_docker_env(args))
    return env


def _image_env(image: str) -> dict[str, str]:
    """The ENV our image ``image`` starts a container with (by repository name; {} for others' images).

    A container sees it under the stack's variables: GPL_ANCHORS__MODEL_DIR of every image meets the
    openai backend of the gpu profile and the prod ConfigMap, so both must load together."""
    repo = _split_image(image)[0].rsplit("/", 1)[-1]
    target = {"gpl-stream": "cpu", "gpl-stream-cuda": "cuda"}.get(repo)
    return _stage_env(dockerfile_stages(), target) if target else {}


def _stage_runs(stages: dict[str, list[tuple[str, str]]], name: str) -> str:
    return " ".join(args for ins, args in stages[name] if ins == "RUN")


def test_dockerfile_stages_and_pins(compose) -> None:
    stages = dockerfile_stages()
    for target in ("cpu", "cuda"):
        assert target in stages, f"Dockerfile has no {target} target"
    external = {args for st in stages.values() for ins, args in st[:1] if args not in stages}
    assert external == {"python:3.11-slim-bookworm"}, external
    builds = {s["build"]["target"] for s in compose["services"].values() if isinstance(s.get("build"), dict)}
    assert builds <= set(stages), f"compose builds unknown targets {builds - set(stages)}"
    assert list(stages)[-1] == "cpu", "the default target (last stage) is the CPU image"


def test_dockerfile_runtime_images_are_non_root_and_offline() -> None:
    stages = dockerfile_stages()
    for target in ("cpu", "cuda"):
        users = [args for ins, args in stages[target] if ins == "USER"]
        assert users and users[-1].split(":")[0] not in ("0", "root"), f"{target} runs as root"
        env = _stage_env(stages, target)
        assert env.get("HF_HUB_OFFLINE") == "1", f"{target}: the hub must be off at run time"
        assert env["GPL_ANCHORS__MODEL_DIR"].startswith("/opt/gpl/models/")
        load_env(env, f"Dockerfile target {target}")
        copies = [args for ins, args in stages[target] if ins == "COPY"]
        assert any("--from=build-" in c and "/opt/venv" in c for c in copies), (
            f"{target}: venv from a build stage"
        )
    assert _stage_env(stages, "cpu")["GPL_ANCHORS__BACKEND"] == "transformers"
    assert _stage_env(stages, "cuda")["GPL_ANCHORS__BACKEND"] == "vllm"


def test_dockerfile_installs_and_bakes_models() -> None:
    stages = dockerfile_stages()
    cpu_build = _stage_runs(stages, "build-cpu")
    args = {
        a.split("=", 1)[0]: a.split("=", 1)[1] for ins, a in stages["build-cpu"] if ins == "ARG" and "=" in a
    }
    assert (
        args["TORCH_VERSION"] == "2.13.0"
        and args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    )
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}"' in cpu_build
    assert cpu_build.index("torch==") < cpu_build.index("pip install ."), "torch (CPU) before the project"
    assert '".[vllm]"' in _stage_runs(stages, "build-cuda")
    assert "gpl models fetch" in _stage_runs(stages, "models")
    rt = [args for ins, args in stages["runtime-base"] if ins == "COPY"]
    assert any(a.startswith("--from=models ") for a in rt), "models are baked at build time"


def test_dockerignore_admits_exactly_what_the_build_copies() -> None:
    lines = [
        ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore is an allow-list"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for ins, args in dockerfile_instructions():
        if ins != "COPY" or args.startswith("--from"):
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert src.rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"
            assert (ROOT / src).exists() or src == "README.md", f"COPY {src}: not in the repository"


# --------------------------------------------------------------------------------------------------
# A small Kustomize: the subset deploy/ uses, nothing more.

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "components", "patches", "namespace", "images"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "ClusterTriggerAuthentication",
}
BUILTIN_GROUPS = {
    "",
    "apps",
    "batch",
    "policy",
    "autoscaling",
    "networking.k8s.io",
    "rbac.authorization.k8s.io",
    "storage.k8s.io",
    "scheduling.k8s.io",
}
# patchMergeKey of the built-in list fields deploy/ patches; other lists are replaced whole
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "volumeDevices": "devicePath",
}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def _group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


def is_builtin(res: dict[str, Any]) -> bool:
    return _group(res["apiVersion"]) in BUILTIN_GROUPS


def _merge_key(field: str, items: list[Any]) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    if field == "ports":
        return "containerPort" if "containerPort" in items[0] else "port"
    return MERGE_KEYS.get(field)


def merge_patch(base: Any, patch: Any, strategic: bool) -> Any:
    """Strategic merge (built-in kinds) or JSON merge (custom resources: lists are replaced)."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if k == "$patch":
            continue
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_patch(out[k], v, strategic)
        elif strategic and isinstance(v, list) and isinstance(out.get(k), list) and (key := _merge_key(k, v)):
            merged = copy.deepcopy(out[k])
            for item in v:
                idx = next((i for i, cur in enumerate(merged) if cur.get(key) == item.get(key)), None)
                if item.get("$patch") == "delete":
                    if idx is not None:
                        merged.pop(idx)
                elif idx is None:
                    merged.append({a: b for a, b in item.items() if a != "$patch"})
                else:
                    merged[idx] = merge_patch(merged[idx], item, strategic)
            out[k] = merged
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _matches_target(res: dict[str, Any], target: dict[str, Any]) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace", "labelSelector"}
    assert not unknown, f"patch target fields not implemented: {unknown}"
    api = res["apiVersion"]
    version = api.split("/")[-1]
    labels = res.get("metadata", {}).get("labels", {})
    checks = [
        "group" not in target or target["group"] == _group(api),
        "version" not in target or target["version"] == version,
        "kind" not in target or target["kind"] == res["kind"],
        "name" not in target or re.fullmatch(target["name"], res["metadata"]["name"]) is not None,
        "namespace" not in target or target["namespace"] == res["metadata"].get("namespace"),
        "labelSelector" not in target
        or all(
            labels.get(k) == v for k, v in (kv.split("=", 1) for kv in target["labelSelector"].split(","))
        ),
    ]
    return all(checks)


def _apply_patches(resources: list[dict[str, Any]], k: dict[str, Any], where: Path) -> list[dict[str, Any]]:
    for entry in k.get("patches", []):
        unknown = set(entry) - {"path", "patch", "target"}
        assert not unknown, f"{where}: patch fields not implemented: {unknown}"
        docs = (
            _load_docs(where / entry["path"]) if "path" in entry else list(yaml.safe_load_all(entry["patch"]))
        )
        for patch in docs:
            assert isinstance(patch, dict), f"{where}: only strategic-merge patches are implemented"
            if "target" in entry:
                hits = [i for i, r in enumerate(resources) if _matches_target(r, entry["target"])]
            else:
                hits = [
                    i
                    for i, r in enumerate(resources)
                    if r["kind"] == patch["kind"]
                    and r["metadata"]["name"] == patch["metadata"]["name"]
                    and _group(r["apiVersion"]) == _group(patch["apiVersion"])
                ]
                assert len(hits) == 1, (
                    f"{where}: patch {patch['kind']}/{patch['metadata']['name']} matches {len(hits)}"
                )
            assert hits, f"{where}: patch {entry} matches nothing"
            if patch.get("$patch") == "delete":
                resources = [r for i, r in enumerate(resources) if i not in hits]
                continue
            body = {kk: vv for kk, vv in patch.items() if kk not in ("apiVersion", "kind", "metadata")}
            meta = {kk: vv for kk, vv in patch.get("metadata", {}).items() if kk != "name"}
            for i in hits:
                res = resources[i]
                merged = merge_patch(res, body, strategic=is_builtin(res))
                if meta:
                    merged["metadata"] = merge_patch(merged["metadata"], meta, strategic=False)
                resources[i] = merged
    return resources


def _split_image(image: str) -> tuple[str, str]:
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return name, tag


def _containers(res: dict[str, Any]) -> list[dict[str, Any]]:
    if res["kind"] not in POD_KINDS:
        return []
    spec = res["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _apply_images(resources: list[dict[str, Any]], images: list[dict[str, str]]) -> None:
    for rule in images:
        unknown = set(rule) - {"name", "newName", "newTag"}
        assert not unknown, f"image fields not implemented: {unknown}"
        for res in resources:
            for c in _containers(res):
                name, tag = _split_image(c["image"])
                if name == rule["name"]:
                    c["image"] = f"{rule.get('newName', name)}:{rule.get('newTag', tag)}"


def kustomize(directory: Path, resources: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Render a kustomization (or apply a Component to ``resources``)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: kustomization fields not implemented by this renderer: {unknown}"
    out = list(resources or [])
    for r in k.get("resources", []):
        p = (directory / r).resolve()
        out += kustomize(p) if p.is_dir() else _load_docs(p)
    for c in k.get("components", []):
        comp = (directory / c).resolve()
        assert yaml.safe_load((comp / "kustomization.yaml").read_text())["kind"] == "Component"
        out = kustomize(comp, out)
    out = _apply_patches(out, k, directory)
    if "namespace" in k:
        for res in out:
            if res["kind"] not in CLUSTER_SCOPED:
                res["metadata"]["namespace"] = k["namespace"]
    _apply_images(out, k.get("images", []))
    return out


def test_renderer_semantics() -> None:
    """The renderer follows Kustomize where deploy/ relies on it."""
    dep = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "a",
                            "image": "x:1",
                            "env": [{"name": "A", "value": "1"}],
                            "args": ["p", "q"],
                            "resources": {"limits": {"cpu": "1", "nvidia.com/gpu": 1}},
                        }
                    ]
                }
            }
        },
    }
    patch = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "a",
                            "env": [{"name": "B", "value": "2"}],
                            "args": ["r"],
                            "resources": {"limits": {"nvidia.com/gpu": None}},
                        }
                    ]
                }
            }
        }
    }
    c = merge_patch(dep, patch, strategic=True)["spec"]["template"]["spec"]["containers"]
    assert len(c) == 1 and [e["name"] for e in c[0]["env"]] == ["A", "B"]  # merged by name
    assert c[0]["args"] == ["r"]  # lists without a merge key are replaced
    assert c[0]["resources"]["limits"] == {"cpu": "1"}  # null deletes
    so = {"spec": {"triggers": [{"type": "kafka", "metadata": {"topic": "a"}}], "max": 3}}
    assert merge_patch(so, {"spec": {"triggers": [{"type": "cron", "metadata": {}}]}}, strategic=False)[
        "spec"
    ] == {"triggers": [{"type": "cron", "metadata": {}}], "max": 3}  # custom resources: JSON merge
    assert _split_image("registry:5000/a/b") == ("registry:5000/a/b", "")
    assert _split_image("registry:5000/a/b:1.2") == ("registry:5000/a/b", "1.2")


# --------------------------------------------------------------------------------------------------
# Kubernetes manifests


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {o: kustomize(DEPLOY / o) for o in OVERLAYS}


def _find(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]


def _one(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = _find(resources, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _crd_schema(res: dict[str, Any]) -> dict[str, Any]:
    g, v = res["apiVersion"].split("/")
    path = SCHEMAS / "crds" / f"{g}_{v}_{res['kind']}.json"
    assert path.exists(), f"no schema for {res['apiVersion']} {res['kind']}"
    return json.loads(path.read_text())


def validate_resource(res: dict[str, Any]) -> None:
    if is_builtin(res):
        try:
            kubernetes_validate.validate(res, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(map(str, e.path))
            raise AssertionError(f"{res['kind']}/{res['metadata']['name']}: {path}: {e.message}") from None
    else:
        errors = list(jsonschema.Draft202012Validator(_crd_schema(res)).iter_errors(res))
        assert not errors, f"{res['kind']}/{res['metadata']['name']}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )


def _settings_map(resources: list[dict[str, Any]]) -> dict[str, str]:
    return _one(resources, "ConfigMap", "gpl-settings")["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_are_valid(rendered, overlay: str) -> None:
    resources = rendered[overlay]
    ids = [(r["apiVersion"].split("/")[0], r["kind"], r["metadata"]["name"]) for r in resources]
    assert len(ids) == len(set(ids)), f"duplicate resources: {sorted(i for i in ids if ids.count(i) > 1)}"
    for res in resources:
        validate_resource(res)
    if overlay != "base":
        assert all(r["metadata"].get("namespace") for r in resources), "overlays set the namespace"


def test_validation_rejects_typos(rendered) -> None:
    dep = copy.deepcopy(_one(rendered["base"], "Deployment", "gpl-labeler"))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(AssertionError):
        validate_resource(dep)
    so = copy.deepcopy(_one(rendered["base"], "ScaledObject", "gpl-labeler"))
    so["spec"]["maxReplicas"] = 3
    with pytest.raises(AssertionError):
        validate_resource(so)
    topic = copy.deepcopy(_one(rendered["base"], "KafkaTopic", "recall"))
    topic["spec"]["partitions"] = "12"
    with pytest.raises(AssertionError):
        validate_resource(topic)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_topics_match_the_contracts(rendered, overlay: str) -> None:
    resources = rendered[overlay]
    topics = {t["spec"]["topicName"]: t for t in _find(resources, "KafkaTopic")}
    settings = _settings_map(resources)
    # the names the stages will use: the prefix and any per-topic rename (GPL_KAFKA__TOPIC_NAMES, JSON)
    renames = json.loads(settings.get("GPL_KAFKA__TOPIC_NAMES", "{}"))
    before = configure(Naming(settings.get("GPL_KAFKA__TOPIC_PREFIX", ""), renames))
    try:
        assert sorted(topics) == sorted(all_topic_names()), "KafkaTopics must be exactly schemas/topics.py + DLQs"
        specs = {name: by_name(name) for name in topics}
    finally:
        configure(before)
    partitions = int(settings["GPL_KAFKA__PARTITIONS"])
    replication = int(settings["GPL_KAFKA__REPLICATION_FACTOR"])
    brokers = sum(
        p["spec"]["replicas"] for p in _find(resources, "KafkaNodePool") if "broker" in p["spec"]["roles"]
    )
    for name, t in topics.items():
        spec = t["spec"]
        assert spec["partitions"] == partitions, f"{name}: partitions differ from GPL_KAFKA__PARTITIONS"
        assert spec["replicas"] == replication, f"{name}: replicas differ from GPL_KAFKA__REPLICATION_FACTOR"
        assert spec["replicas"] <= brokers, f"{name}: more replicas than brokers"
        min_isr = int(spec.get("config", {}).get("min.insync.replicas", 1))
        assert min_isr <= spec["replicas"] and (spec["replicas"] == 1 or min_isr < spec["replicas"]), name
        base = specs[name]
        compacted = spec.get("config", {}).get("cleanup.policy") == "compact"
        assert compacted == bool(base and base.compacted and not name.endswith(".dlq")), (
            f"{name}: cleanup.policy"
        )
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == "gpl"
    kafka = _one(resources, "Kafka", "gpl")
    assert int(kafka["spec"]["kafka"]["config"]["message.max.bytes"]) >= Settings().kafka.max_message_bytes
    bootstrap_port = int(settings["GPL_KAFKA__BOOTSTRAP_SERVERS"].rsplit(":", 1)[1])
    listener = next(lst for lst in kafka["spec"]["kafka"]["listeners"] if lst["port"] == bootstrap_port)
    sasl = settings.get("GPL_KAFKA__SECURITY_PROTOCOL", "PLAINTEXT").startswith("SASL")
    assert listener["tls"] == settings.get("GPL_KAFKA__SECURITY_PROTOCOL", "PLAINTEXT").endswith("SSL")
    assert ("authentication" in listener) == sasl
    roles = {r for p in _find(resources, "KafkaNodePool") for r in p["spec"]["roles"]}
    assert roles == {"controller", "broker"}, "KRaft: controllers and brokers in node pools"


def test_shared_cluster_overlay_names_no_topic_outside_its_prefix(rendered) -> None:
    """overlays/shared-cluster: the stages' prefix (GPL_KAFKA__TOPIC_PREFIX), every KafkaTopic and every KEDA
    trigger agree; the streams trigger watches faust's group, the streams app id under the prefix."""
    resources = rendered["overlays/shared-cluster"]
    prefix = _settings_map(resources)["GPL_KAFKA__TOPIC_PREFIX"]
    assert prefix and prefix != Settings().kafka.topic_prefix
    names = [t["spec"]["topicName"] for t in _find(resources, "KafkaTopic")]
    assert names and [n for n in names if not n.startswith(prefix)] == []
    triggers = [tr["metadata"] for so in _find(resources, "ScaledObject") for tr in so["spec"]["triggers"]]
    assert triggers and all(tr["topic"] in names for tr in triggers), triggers
    before = configure(Naming(prefix))
    try:
        streams_group = app_id(Settings().streams.app_id)
    finally:
        configure(before)
    groups = {tr["consumerGroup"] for tr in triggers if tr["topic"].endswith(("recall", "exposure"))}
    assert groups == {streams_group}, groups


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_never_scales_past_the_partitions(rendered, overlay: str) -> None:
    resources = rendered[overlay]
    partitions = {t["spec"]["topicName"]: t["spec"]["partitions"] for t in _find(resources, "KafkaTopic")}
    settings = _settings_map(resources)
    scaled = _find(resources, "ScaledObject")
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled} >= {f"gpl-{s}" for s in CONSUMED}
    for so in scaled:
        spec = so["spec"]
        target = spec["scaleTargetRef"]["name"]
        _one(resources, "Deployment", target)
        assert spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]
        for trig in spec["triggers"]:
            assert trig["type"] == "kafka"
            md = trig["metadata"]
            assert md["topic"] in partitions, f"{target}: trigger on unknown topic {md['topic']}"
            assert spec["maxReplicaCount"] <= partitions[md["topic"]], (
                f"{overlay}: {so['metadata']['name']} may scale to {spec['maxReplicaCount']} replicas "
                f"but {md['topic']} has {partitions[md['topic']]} partitions"
            )
            assert md["bootstrapServers"] == settings["GPL_KAFKA__BOOTSTRAP_SERVERS"]
            if settings.get("GPL_KAFKA__SECURITY_PROTOCOL", "PLAINTEXT") == "SASL_SSL":
                assert md.get("tls") == "enable" and md.get("sasl") == "scram_sha512"
                _one(resources, "TriggerAuthentication", trig["authenticationRef"]["name"])
        stage = target.removeprefix("gpl-")
        if stage in CONSUMED:
            s = Settings()
            prefix = settings.get("GPL_KAFKA__TOPIC_PREFIX", "")  # the streams app id and topics go under it
            group = prefix + s.streams.app_id if stage == "streams" else f"{s.kafka.group_prefix}-{stage}"
            assert {t["metadata"]["consumerGroup"] for t in spec["triggers"]} == {group}
            assert {t["metadata"]["topic"] for t in spec["triggers"]} == {prefix + t for t in CONSUMED[stage]}
            assert all(t["metadata"]["allowIdleConsumers"] == "false" for t in spec["triggers"])


def _pod_env(resources: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}

    def source(kind: str, name: str) -> dict[str, str]:
        obj = _one(resources, kind, name)
        return obj.get("data", {}) | obj.get("stringData", {})

    for ef in container.get("envFrom", []):
        if "configMapRef" in ef:
            env.update(source("ConfigMap", ef["configMapRef"]["name"]))
        if "secretRef" in ef:
            env.update(source("Secret", ef["secretRef"]["name"]))
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "configMapKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = source("ConfigMap", ref["name"])[ref["key"]]
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = source("Secret", ref["name"])[ref["key"]]
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_stage_deployments(rendered, overlay: str) -> None:
    resources = rendered[overlay]
    settings = load_env(_settings_map(resources), f"{overlay} ConfigMap gpl-settings")
    pdbs = _find(resources, "PodDisruptionBudget")
    for stage in STAGES:
        dep = _one(resources, "Deployment", f"gpl-{stage}")
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (c,) = pod["spec"]["containers"]
        assert c["args"] == ["run", "--stages", stage]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == settings.metrics_port
        for probe, path in PROBE_PATHS.items():
            assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}, f"{stage}: {probe}"
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][part]), f"{stage}: resources.{part}"
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items() for p in pdbs), (
            f"{stage}: no PDB"
        )
        s = load_env(_image_env(c["image"]) | _pod_env(resources, c), f"{overlay} gpl-{stage}")
        assert s.kafka.partitions == settings.kafka.partitions
        if stage == "trainer":
            vols = {v["name"]: v for v in pod["spec"]["volumes"]}
            mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(s.data_dir))
            claim = vols[mount["name"]]["persistentVolumeClaim"]["claimName"]
            _one(resources, "PersistentVolumeClaim", claim)
            assert dep["spec"]["strategy"]["type"] == "Recreate" and dep["spec"]["replicas"] == 1
        else:
            assert "replicas" not in dep["spec"], f"{stage}: KEDA owns the replica count"


OPERATOR_SECRETS = {"gpl-cluster-ca-cert"}  # created by Strimzi for the Kafka cluster `gpl`


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(rendered, overlay: str) -> None:
    resources = rendered[overlay]
    names = {(r["kind"], r["metadata"]["name"]) for r in resources}
    pods = [r["spec"]["template"] for r in resources if r["kind"] in POD_KINDS]
    for pod in pods:
        for v in pod["spec"].get("volumes", []):
            if "secret" in v:
                assert ("Secret", v["secret"]["secretName"]) in names or v["secret"][
                    "secretName"
                ] in OPERATOR_SECRETS
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
        for c in pod["spec"]["containers"]:
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            vols = {v["name"] for v in pod["spec"].get("volumes", [])}
            vcts = {
                t["metadata"]["name"]
                for r in resources
                if r["kind"] == "StatefulSet"
                for t in r["spec"].get("volumeClaimTemplates", [])
            }
            assert mounts <= vols | vcts, f"unknown volumes {mounts - vols - vcts}"
            _pod_env(resources, c)  # every configMap/secret key reference resolves
            name, tag = _split_image(c["image"])
            assert tag and tag != "latest", f"image {c['image']} is not pinned"
    for svc in _find(resources, "Service"):
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= p["metadata"]["labels"].items() for p in pods), (
            f"Service {svc['metadata']['name']}"
        )
    for sm in _find(resources, "ServiceMonitor"):
        sel = sm["spec"]["selector"]["matchLabels"]
        svcs = [
            s for s in _find(resources, "Service") if sel.items() <= s["metadata"].get("labels", {}).items()
        ]
        assert svcs, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        ports = {p["name"] for s in svcs for p in s["spec"]["ports"]}
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= ports
    statefulset = _one(resources, "StatefulSet", "qdrant")
    _one(resources, "Service", statefulset["spec"]["serviceName"])
    assert statefulset["spec"]["volumeClaimTemplates"], "Qdrant keeps its data on a PVC"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_placeholders(rendered, overlay: str) -> None:
    for sec in _find(rendered[overlay], "Secret"):
        assert "data" not in sec, "keep placeholders readable in stringData"
        for key, value in sec["stringData"].items():
            if re.search(r"PASSWORD|API_KEY|TOKEN|SECRET", key):
                assert value == "CHANGE_ME", f"{sec['metadata']['name']}.{key} must stay a placeholder"


def _gpu_pods(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for r in resources:
        if r["kind"] in POD_KINDS:
            for c in r["spec"]["template"]["spec"]["containers"]:
                if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}):
                    out[r["metadata"]["name"]] = r
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_workloads(rendered, overlay: str) -> None:
    resources = rendered[overlay]
    gpu = _gpu_pods(resources)
    expected = {
        "base": set(),
        "overlays/dev": set(),
        "overlays/prod": {"gpl-vllm"},
        "overlays/prod-gpu-workers": {"gpl-anchors"},
        "overlays/shared-cluster": set(),
    }[overlay]
    assert set(gpu) == expected
    for name, dep in gpu.items():
        spec = dep["spec"]["template"]["spec"]
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, name
        assert any(
            t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"]
        ), name
        c = spec["containers"][0]
        assert "gpl-stream-cuda" in c["image"], f"{name}: GPU pods run the CUDA image"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
    if overlay == "overlays/prod":
        settings = load_env(_settings_map(resources), "prod ConfigMap")
        assert settings.anchors.backend == "openai"
        vllm = _one(resources, "Deployment", "gpl-vllm")["spec"]["template"]["spec"]["containers"][0]
        assert vllm["command"] == ["vllm", "serve"] and settings.anchors.model_name in vllm["args"]
        assert _settings_map(resources)["GPL_ANCHORS__BASE_URL"] == "http://gpl-vllm:8000/v1"
        _one(resources, "Service", "gpl-vllm")
    if overlay == "overlays/prod-gpu-workers":
        anchors = _one(resources, "Deployment", "gpl-anchors")
        env = _pod_env(resources, anchors["spec"]["template"]["spec"]["containers"][0])
        assert load_env(env, "GPU anchor worker").anchors.backend == "vllm"
        assert not _find(resources, "Deployment", "gpl-vllm") and not _find(
            resources, "ScaledObject", "gpl-vllm"
        )


def test_prod_kafka_security(rendered) -> None:
    resources = rendered["overlays/prod"]
    user = _one(resources, "KafkaUser", "gpl")
    ref = user["spec"]["authentication"]["password"]["valueFrom"]["secretKeyRef"]
    secret = _one(resources, "Secret", ref["name"])["stringData"]
    assert ref["key"] == "GPL_KAFKA__SASL_PASSWORD" and secret["GPL_KAFKA__SASL_USERNAME"] == "gpl"
    s = load_env(_settings_map(resources) | secret, "prod settings + secret")
    assert s.kafka.security_protocol == "SASL_SSL" and s.kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert s.kafka.replication_factor == 3
    for stage in STAGES:
        c = _one(resources, "Deployment", f"gpl-{stage}")["spec"]["template"]["spec"]["containers"][0]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert str(Path(s.kafka.ssl_ca_location).parent) in mounts, f"{stage}: Kafka CA not mounted"
    assert not _find(resources, "KafkaNodePool", "dual")


def iter_k8s_files() -> Iterator[Path]:
    one_host = ("prometheus.yml", "prometheus-rules.yml")  # compose.yaml's, not Kubernetes manifests
    yield from (p for p in deploy_files() if p.suffix in (".yaml", ".yml") and p.name not in one_host)


def test_every_manifest_file_is_rendered(rendered) -> None:
    """No manifest under deploy/ is left out of every kustomization (it would never be applied)."""
    used: set[Path] = set()
    for directory in [p.parent for p in DEPLOY.rglob("kustomization.yaml")]:
        k = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used.add((directory / "kustomization.yaml").resolve())
        for r in k.get("resources", []):
            used.add((directory / r).resolve())
        for entry in k.get("patches", []):
            if "path" in entry:
                used.add((directory / entry["path"]).resolve())
    orphans = [str(p.relative_to(ROOT)) for p in iter_k8s_files() if p.resolve() not in used]
    assert not orphans, f"manifests no kustomization uses: {orphans}"


def test_probe_paths_are_served_by_the_stage_http_server() -> None:
    """The paths deploy/ and compose.yaml probe exist on the real server and answer JSON stage state."""
    import urllib.error
    import urllib.request

    from runtime.health import serve_http

    server = serve_http(0, host="127.0.0.1")
    port = server.server_address[1]
    try:
        for path in sorted(set(PROBE_PATHS.values())):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                    code, body = r.status, r.read()
            except urllib.error.HTTPError as e:  # 503 is an answer too (no stage ready here)
                code, body = e.code, e.read()
            assert code in (200, 503), f"{path}: {code}"
            assert "stages" in json.loads(body), path
    finally:
        server.shutdown()
# --------------------------------------------------------------------------------------------------
# observability: the Grafana dashboard and the PrometheusRule alerts query what the code defines

GRAFANA = DEPLOY / "grafana"
# Prometheus' own series a query may use besides ours (`up`: the scrape of a target succeeded)
PROMETHEUS_BUILTINS = {"up"}
# Grafana's built-in variables, replaced by a sample value so the query parses as plain PromQL
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


# where the code declares metrics (runtime/metrics.py's docstring): the foundation's shared ones in
# runtime/metrics.py, each stage's in its package's metrics.py (the calibration monitor, one module:
# workers/calibration_metrics.py); the application layer declares none
METRIC_PACKAGES = ("runtime", "streams", "workers")
PROMETHEUS_TYPES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}


def is_metric_module(path: Path) -> bool:
    return path.stem == "metrics" or path.stem.endswith("_metrics")


def metric_modules() -> list[str]:
    """Every module that declares metrics: ``metrics.py`` or ``*_metrics.py`` of the foundation and the stages."""
    return [".".join(path.relative_to(ROOT).with_suffix("").parts)
            for pkg in METRIC_PACKAGES for path in sorted((ROOT / pkg).rglob("*.py")) if is_metric_module(path)]


def declared_metrics() -> list[Any]:
    """The metric objects those modules declare (importing a module registers its families)."""
    import importlib

    from prometheus_client.metrics import MetricWrapperBase

    return [obj for name in metric_modules() for obj in vars(importlib.import_module(name)).values()
            if isinstance(obj, MetricWrapperBase)]


def defined_series() -> dict[str, str]:
    """Series name -> family name of every gpl_* metric the code defines (counters' _total, histograms' parts)."""
    out: dict[str, str] = {}
    for metric in declared_metrics():
        for fam in metric.describe():
            if not fam.name.startswith("gpl_"):
                continue
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                        "summary": ("", "_sum", "_count")}.get(fam.type, ("",))
            for s in suffixes:
                out[fam.name + s] = fam.name
    return out


def promql_series(expr: str) -> set[str]:
    """Every metric name an expression selects; raises ValueError when it is not valid PromQL."""
    import promql_parser

    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next((m.value for m in node.matchers.matchers if m.name == "__name__"), None)
            assert name, f"selector without a metric name in {expr!r}"
            names.add(name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every dashboard under deploy/grafana/."""
    out = []
    for path in sorted(GRAFANA.glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                out.append((f"{path.name}: {panel['title']}", t["expr"]))
    return out


def alert_rules(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rules = _find(rendered["base"], "PrometheusRule")
    assert rules, "base renders no PrometheusRule"
    return [r for res in rules for g in res["spec"]["groups"] for r in g["rules"]]


def test_promql_checks_catch_mistakes() -> None:
    """The checks below would notice a typo in a metric name and a query that does not parse."""
    assert promql_series('sum by (stage) (rate(gpl_messages_total{outcome="in"}[$__rate_interval]))') == {
        "gpl_messages_total"}
    assert "gpl_mesages_total" not in defined_series() and "gpl_messages_total" in defined_series()
    assert "gpl_exposure_to_samples_seconds_bucket" in defined_series()
    with pytest.raises(ValueError):
        promql_series("sum by (stage) (rate(gpl_messages_total[5m])")


def test_metric_catalogue_reads_every_metric_module() -> None:
    """The catalogue the checks below compare against collects the shared metrics and every stage's: a
    stage's metric module that is not found (renamed, moved) would hide its names from the checks."""
    assert {"runtime.metrics", "streams.metrics", "workers.anchors.metrics", "workers.labeler.metrics",
            "workers.trainer.metrics", "workers.calibration_metrics"} <= set(metric_modules())
    defined = defined_series()
    for shared_or_stage in ("gpl_messages_total", "gpl_join_pending_requests", "gpl_anchor_tokens_total",
                            "gpl_labeler_abstaining", "gpl_trainer_loss", "gpl_pseudo_label_ece"):
        assert shared_or_stage in defined, shared_or_stage
    assert len(set(defined.values())) == len(declared_metrics())  # one family per metric, no name twice


def test_metrics_are_declared_only_in_metric_modules() -> None:
    """A metric constructed anywhere else would be on /metrics but unknown to the catalogue (and the checks)."""
    import ast

    stray = []
    for pkg in (*METRIC_PACKAGES, "schemas", "gpl"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if pkg in METRIC_PACKAGES and is_metric_module(path):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prometheus_client"):
                    stray += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name in PROMETHEUS_TYPES]
    assert not stray, f"metrics declared outside a metric module: {stray}"


def test_dashboard_json_is_a_grafana_dashboard() -> None:
    paths = sorted(GRAFANA.glob("*.json"))
    assert paths, "no dashboard in deploy/grafana/"
    for path in paths:
        dash = json.loads(path.read_text())
        assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
        for p in dash["panels"]:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, f"{p['title']}: gridPos {g}"
            if p["type"] == "row":
                continue
            assert p["targets"], f"{p['title']}: no query"
            uid = p["datasource"]["uid"]
            assert uid.strip("${}") in variables, f"{p['title']}: datasource {uid} is no dashboard variable"
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), f"{p['title']}: duplicate refIds"


def test_dashboard_queries_only_defined_metrics_and_covers_them_all() -> None:
    defined = defined_series()
    used: set[str] = set()
    for where, expr in dashboard_exprs():
        try:
            names = promql_series(expr)
        except ValueError as e:
            raise AssertionError(f"{where}: not PromQL: {expr!r}: {e}") from None
        unknown = names - set(defined) - PROMETHEUS_BUILTINS
        assert not unknown, f"{where}: {sorted(unknown)} are defined in no metric module"
        used |= {defined[n] for n in names if n in defined}
    missing = set(defined.values()) - used
    assert not missing, f"metrics no dashboard panel shows: {sorted(missing)}"


def test_alert_rules_are_valid_and_query_defined_metrics(rendered) -> None:
    defined = defined_series()
    rules = alert_rules(rendered)
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    used: set[str] = set()
    for r in rules:
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
        assert r["annotations"].get("summary") and r["annotations"].get("description"), r["alert"]
        assert re.fullmatch(r"(\d+[smhdwy])+", r.get("for", "")), f"{r['alert']}: give it a `for` duration"
        try:
            series = promql_series(r["expr"])
        except ValueError as e:
            raise AssertionError(f"{r['alert']}: not PromQL: {e}") from None
        unknown = series - set(defined) - PROMETHEUS_BUILTINS
        assert not unknown, f"{r['alert']}: {sorted(unknown)} are defined in no metric module"
        used |= series
        for text in r["annotations"].values():  # Go templates: balanced braces, only $labels/$value
            assert text.count("{{") == text.count("}}"), f"{r['alert']}: unbalanced template"
            for ref in re.findall(r"\{\{\s*\$(\w+)", text):
                assert ref in {"labels", "value"}, f"{r['alert']}: unknown template variable ${ref}"
    # what the issue asks the alerts to watch
    for needed in ("gpl_consumer_lag_messages", "gpl_messages_total", "gpl_stage_up", "up", "gpl_calibration_drift",
                   # issue 22: split requests, exposure → samples p99, a stalled checkpoint or publication
                   "gpl_streams_split_requests_total", "gpl_exposure_to_samples_seconds_bucket",
                   "gpl_trainer_last_checkpoint_timestamp_seconds", "gpl_trainer_publish_decisions_total"):
        assert needed in used, f"no alert on {needed}"
    assert {"GplSplitRequests", "GplExposureToSamplesSlow", "GplCheckpointStalled", "GplPublishStalled"} <= set(names)


def test_alert_rule_schema_rejects_typos(rendered) -> None:
    res = copy.deepcopy(_find(rendered["base"], "PrometheusRule")[0])
    res["spec"]["groups"][0]["rules"][0]["fro"] = "5m"
    with pytest.raises(AssertionError):
        validate_resource(res)
    res = copy.deepcopy(_find(rendered["base"], "PrometheusRule")[0])
    res["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    with pytest.raises(AssertionError):
        validate_resource(res)


def test_compose_scrape_keeps_the_series_own_stage_label() -> None:
    """A target label named like a label of our series would rename the series' own (exported_stage)."""
    ours = {label for obj in declared_metrics() for label in obj._labelnames}
    assert {"stage", "topic", "outcome"} <= ours
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    for job in prom["scrape_configs"]:
        for rc in job.get("relabel_configs", []):
            assert rc.get("target_label") not in ours, f"{job['job_name']}: relabels onto {rc['target_label']}"
