"""deploy/docker-compose.yml and deploy/k8s/ checked without a Docker engine or a cluster.

No Docker engine runs on these machines, so the production manifests cannot be started here.
What can be checked is checked:
  * the compose file against the Compose Specification's own JSON schema (the one compose-go,
    the library `docker compose` is built on, validates with; fetched once from the Go module
    proxy, pinned by hash);
  * every Kubernetes manifest against the Kubernetes API's OpenAPI schemas, strictly (unknown
    fields rejected), with kubernetes-validate;
  * that they fit this product: each container's command is a real `metering` CLI command,
    each METERING_* variable is one the code reads, probes hit the metrics port the workers
    serve /healthz and /readyz on, referenced ConfigMaps/Secrets/Deployments exist, the
    Kustomization lists every manifest, and the catalog and accounts shipped in the ConfigMap
    load with the real catalog and accounts parsers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

from metering import cli
from metering.config import env_names
from metering.local_services import state_dir
from rating.accounts import parse_accounts
from rating.catalog import parse_catalog

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.31", "1.34")  # oldest and newest the manifests are meant for

COMPOSE_GO = "v2.16.2"
COMPOSE_GO_ZIP_SHA256 = "75410c9723430b920592093014fc53641f6207e01b52c016c848ba62bf2da805"
COMPOSE_GO_PATH = f"github.com/compose-spec/compose-go/v2/@v/{COMPOSE_GO}.zip"
COMPOSE_SCHEMA_IN_ZIP = f"github.com/compose-spec/compose-go/v2@{COMPOSE_GO}/schema/compose-spec.json"


def compose_schema() -> dict[str, Any]:
    """The Compose Specification schema from compose-go, fetched once into .state/cache."""
    cached = state_dir() / "cache" / f"compose-spec-{COMPOSE_GO}.json"
    if not cached.exists():
        # the first http(s) proxy of GOPROXY (as the go command would use), else the public one
        proxies = [u for u in re.split(r"[,|]", os.environ.get("GOPROXY", "")) if u.startswith("http")]
        url = f"{(proxies or ['https://proxy.golang.org'])[0].rstrip('/')}/{COMPOSE_GO_PATH}"
        with urllib.request.urlopen(url, timeout=60) as resp:
            blob = resp.read()
        digest = hashlib.sha256(blob).hexdigest()
        assert digest == COMPOSE_GO_ZIP_SHA256, f"{url}: sha256 {digest}, expected the pinned one"
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            text = zf.read(COMPOSE_SCHEMA_IN_ZIP)
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(text)
    schema: dict[str, Any] = json.loads(cached.read_text())
    return schema


def known_env_names() -> set[str]:
    """Every METERING_* variable the code reads: Settings' fields plus the names spelled out."""
    names = set(env_names())  # METERING_CATALOG for catalog_path..., and no METERING_TOPICS
    for package in ("metering", "wallet_debiter"):
        for path in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"METERING_[A-Z0-9_]+", path.read_text()))
    return names


def cli_commands_ok(commands: set[tuple[str, ...]]) -> None:
    """Each command line is one the `metering` CLI accepts: parsed by click down to the last
    subcommand, arguments and choices checked, nothing run (`--help` would not do: click
    answers it before checking a choice like `worker sinks`)."""
    assert commands
    for args in sorted(commands):
        cmd: click.Command = cli.main
        name, rest, ctx = "metering", list(args), None
        try:
            while True:
                ctx = cmd.make_context(name, rest, parent=ctx)
                if not isinstance(cmd, click.Group):
                    break
                sub_name, sub, rest = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
                assert sub is not None and sub_name is not None
                name, cmd = sub_name, sub
        except click.UsageError as exc:
            raise AssertionError(f"`metering {' '.join(args)}` is not a CLI command: {exc}") from None


def env_names_ok(names: set[str], where: str) -> None:
    unknown = {n for n in names if n.startswith("METERING_")} - known_env_names()
    assert not unknown, f"{where}: variables no code reads (a typo?): {sorted(unknown)}"


# ---------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return doc


def test_compose_file_is_valid_by_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    # the check can fail: a misspelt key is refused by the same schema
    broken = {**compose, "services": {**compose["services"], "redis": {**compose["services"]["redis"], "restrat": "no"}}}
    assert any("restrat" in e.message for e in validator.iter_errors(broken))


def test_compose_services_fit_the_product(compose: dict[str, Any]) -> None:
    services: dict[str, dict[str, Any]] = compose["services"]
    ours = {name: s for name, s in services.items() if s.get("image", "").startswith("metering:")}
    assert {"setup", "worker-rating", "worker-debit", "worker-sink", "worker-alerts", "api"} <= set(ours)
    for name, s in services.items():
        for dep in s.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
    cli_commands_ok({tuple(s["command"]) for s in ours.values()})
    for name, s in ours.items():
        env = s["environment"]
        env_names_ok(set(env), f"docker-compose service {name}")
        assert env["METERING_KAFKA_BOOTSTRAP"].split(":")[0] in services
        assert env["METERING_REDIS_URL"].split("//")[1].split(":")[0] in services
        assert env["METERING_CLICKHOUSE_DSN"].split("@")[1].split(":")[0] in services
        if not s["healthcheck"].get("disable"):  # the one-shot setup has none
            probe = " ".join(s["healthcheck"]["test"])
            assert f":{env['METERING_METRICS_PORT']}/readyz" in probe, name
    api = ours["api"]
    assert any(p.endswith(f":{api['environment']['METERING_API_PORT']}") for p in api["ports"])
    dockerfile = (ROOT / compose["x-metering"]["build"]["context"].replace("..", ".") / compose["x-metering"]["build"]["dockerfile"])
    assert dockerfile.resolve() == (DEPLOY / "Dockerfile").resolve() and dockerfile.exists()
    text = dockerfile.read_text()
    for package in ("metering", "rating", "wallet_debiter", "schemas"):
        assert f"COPY {package} ./{package}" in text, f"the image lacks the {package} package"
    assert 'ENTRYPOINT ["metering"]' in text


# ---------------------------------------------------------------------------- kubernetes


@pytest.fixture(scope="module")
def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) >= 10
    return docs


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_are_valid_kubernetes_objects(k8s_docs: list[tuple[str, dict[str, Any]]], version: str) -> None:
    for name, doc in k8s_docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name} {doc['kind']}/{doc['metadata']['name']} (k8s {version}): {exc}") from None
    deployment = next(d for _, d in k8s_docs if d["kind"] == "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: a misspelt field is refused
        kubernetes_validate.validate(broken, version, strict=True)


def _pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in docs if d["kind"] in ("Deployment", "Job")]


def test_k8s_manifests_fit_the_product(k8s_docs: list[tuple[str, dict[str, Any]]]) -> None:
    docs = [d for _, d in k8s_docs]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}, "kustomization resources"
    assert {d["metadata"].get("namespace", kustomization["namespace"]) for d in docs} == {kustomization["namespace"]}
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    env_map = by_kind["ConfigMap"]["metering-env"]["data"]
    env_names_ok(set(env_map), "ConfigMap metering-env")
    env_names_ok(set(by_kind["Secret"]["metering-secrets"].get("stringData", {})), "Secret metering-secrets")

    commands: set[tuple[str, ...]] = set()
    for name, pod in _pod_specs(docs):
        for vol in pod.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in by_kind["ConfigMap"], f"{name}: volume {vol['name']}"
        for c in pod["containers"]:
            assert c["image"] in {i["name"] for i in kustomization["images"]}, f"{name}: image {c['image']}"
            commands.add(tuple(c["args"]))
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef") or src.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in src else "Secret"
                assert ref["name"] in by_kind[kind], f"{name}: envFrom {kind} {ref['name']}"
            env_names_ok({e["name"] for e in c.get("env", [])}, f"{name} container {c['name']}")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe"):
                if probe in c:
                    get = c[probe]["httpGet"]
                    assert get["path"] in ("/healthz", "/readyz"), f"{name}: {probe} path"
                    assert ports[get["port"]] == int(env_map["METERING_METRICS_PORT"]), f"{name}: {probe} port"
    cli_commands_ok(commands)
    assert {("worker", "rating"), ("worker", "debit"), ("worker", "sink"), ("worker", "alerts"),
            ("serve-api",), ("setup",)} <= commands
    for hpa in by_kind["HorizontalPodAutoscaler"].values():
        target = hpa["spec"]["scaleTargetRef"]
        assert target["name"] in by_kind[target["kind"]], f"HPA {hpa['metadata']['name']}"
    for svc in by_kind["Service"].values():
        selected = [d for d in by_kind["Deployment"].values()
                    if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)} deployments"

    # the shipped catalog and accounts are real ones: they load with the product's parsers
    files = by_kind["ConfigMap"]["metering-catalog"]["data"]
    catalog = parse_catalog(yaml.safe_load(files["catalog.yaml"]), source="ConfigMap metering-catalog")
    accounts = parse_accounts(yaml.safe_load(files["accounts.yaml"]), catalog)
    assert catalog.version and accounts
    assert env_map["METERING_CATALOG"] == "/config/catalog.yaml" and env_map["METERING_ACCOUNTS"] == "/config/accounts.yaml"
