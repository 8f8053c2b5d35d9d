"""KubeRay manifests: schema validation against the KubeRay CRDs, and the submitter's quoting.

The CRD schemas are KubeRay's own (`ray.io_rayjobs.yaml`, `ray.io_rayclusters.yaml`),
found in ../shared/kuberay-crds beside the repository or in $STALWART_KUBERAY_CRDS.
They are validated strictly: an unknown field fails, as with `kubectl apply
--validate=strict`, so a misspelt field cannot be dropped silently.

The quoting test renders the submitter command the way KubeRay's operator does in
K8sJobMode (`BuildJobSubmitCommand` in ray-operator/controllers/ray/common/job.go,
KubeRay 1.x): the words joined by spaces and run with `bash -ce`. `ray` is a stub
whose `job submit` runs Ray's real CLI code with the HTTP client replaced, and the
entrypoint string it would send is then run with /bin/sh, as Ray's job supervisor
runs it (`subprocess.Popen(entrypoint, shell=True)`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from service.cli import build_parser
from service.config import config_from_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
KUBERAY_DIR = REPO_ROOT / "deploy" / "kuberay"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
SPECIAL_ARGUMENT = 'data.paths=["/data/corpus (v2);final/*.jsonl"]'


def crd_folder() -> Path:
    configured = os.environ.get("STALWART_KUBERAY_CRDS")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "kuberay-crds"


def strict(schema: Any) -> Any:
    """Return a copy of an OpenAPI schema in which objects with listed properties allow no others."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    if ("properties" in result and "additionalProperties" not in result
            and not result.get("x-kubernetes-preserve-unknown-fields")):
        result["additionalProperties"] = False
    return result


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft7Validator]:
    folder = crd_folder()
    if not folder.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {folder}; set STALWART_KUBERAY_CRDS to their folder")
    found = {}
    for kind, file_name in CRD_FILES.items():
        crd = yaml.safe_load((folder / file_name).read_text(encoding="utf-8"))
        version = next(item for item in crd["spec"]["versions"] if item["name"] == "v1")
        found[kind] = jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))
    return found


def manifests() -> list[tuple[str, dict]]:
    documents = []
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document:
                documents.append((path.name, document))
    return documents


def ray_documents(kind: str) -> list[dict]:
    return [document for _, document in manifests() if document["kind"] == kind]


def schema_errors(validator: jsonschema.Draft7Validator, document: dict) -> list[str]:
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)]


def rayjob() -> dict:
    (job,) = ray_documents("RayJob")
    return job


def cluster_specs() -> list[dict]:
    return [rayjob()["spec"]["rayClusterSpec"], *(cluster["spec"] for cluster in ray_documents("RayCluster"))]


# Schemas.


def test_manifests_include_rayjob_and_raycluster():
    kinds = [document["kind"] for _, document in manifests()]
    assert kinds.count("RayJob") == 1
    assert kinds.count("RayCluster") == 1


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_manifests_match_crd_schema(validators, kind):
    for document in ray_documents(kind):
        errors = schema_errors(validators[kind], document)
        assert not errors, f"{kind} {document['metadata']['name']}:\n" + "\n".join(errors)


def test_schema_rejects_misspelt_field(validators):
    job = rayjob()
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in error for error in schema_errors(validators["RayJob"], job))


def test_schema_rejects_wrong_type(validators):
    job = rayjob()
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    assert schema_errors(validators["RayJob"], job)


# What the manifests promise.


def test_rayjob_shuts_down_and_retries():
    spec = rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1


def test_clusters_use_token_auth_and_autoscaling():
    for spec in cluster_specs():
        assert spec["authOptions"]["mode"] == "token"
        assert spec["enableInTreeAutoscaling"] is True


def test_gpu_worker_groups_are_elastic():
    for spec in cluster_specs():
        (group,) = spec["workerGroupSpecs"]
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert group["minReplicas"] < group["maxReplicas"]


def pod_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [container for group in groups for container in group["template"]["spec"]["containers"]]


def test_credentials_come_from_secret():
    for spec in cluster_specs():
        for container in pod_containers(spec):
            assert {"secretRef": {"name": "stalwart-storage"}} in container.get("envFrom", [])
            literal = [item["name"] for item in container.get("env", []) if "value" in item and "AWS" in item["name"]]
            assert not literal, f"credentials written into the manifest: {literal}"


def test_head_exposes_metrics_port():
    for spec in cluster_specs():
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        ports = {port["name"]: port["containerPort"] for port in head["ports"]}
        assert ports["stalwart-metrics"] == 9464
        assert head.get("name") == "ray-head"
        labels = spec["headGroupSpec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "stalwart"


def test_podmonitor_matches_head_pods():
    monitor = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "podmonitor.yaml").read_text(encoding="utf-8"))
    selector = monitor["spec"]["selector"]["matchLabels"]
    head_labels = {**rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"],
                   "ray.io/node-type": "head"}  # KubeRay adds the node type to every head pod
    assert selector.items() <= head_labels.items()
    assert [endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]] == ["stalwart-metrics"]


def test_run_config_fits_worker_group():
    (config_map,) = [document for _, document in manifests() if document["kind"] == "ConfigMap"]
    config = config_from_dict(yaml.safe_load(config_map["data"]["run.yaml"]))
    group = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert config.scaling.use_gpu
    assert (config.scaling.min_workers, config.scaling.max_workers) == (group["minReplicas"], group["maxReplicas"])
    assert config.metrics.port == 9464
    assert config.metrics.host == "0.0.0.0"
    volume = rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert "/etc/stalwart/run.yaml" in rayjob()["spec"]["entrypoint"]


def test_worker_pods_stop_node_before_sigterm():
    (config_map,) = [document for _, document in manifests() if document["kind"] == "ConfigMap"]
    stop_grace_s = config_from_dict(yaml.safe_load(config_map["data"]["run.yaml"])).fault_tolerance.stop_grace_s
    for spec in cluster_specs():
        (group,) = spec["workerGroupSpecs"]
        pod = group["template"]["spec"]
        command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "stalwart"
        args = build_parser().parse_args(command[1:])
        assert args.command == "stop-node"
        assert args.drain
        assert args.grace_s > stop_grace_s, "the hook returns before the workers' own grace period ends"
        assert pod["terminationGracePeriodSeconds"] > args.grace_s, "the kubelet kills the pod while the hook waits"


# The submitter's quoting.


def go_quote(text: str) -> str:
    """Quote like Go's strconv.Quote for ASCII text, which KubeRay uses for the runtime env JSON."""
    return json.dumps(text)


def submitter_script(job: dict, dashboard_url: str) -> str:
    """Render the K8sJobMode submitter command as KubeRay 1.x does, words joined by spaces."""
    spec = job["spec"]
    job_id = "stalwart-llama-demo-x7k2p"
    health = ("python -c \"import urllib.request; r=urllib.request.urlopen('" + dashboard_url + "/api/gcs_healthz', "
              "timeout=10); exit(0 if b'success' in r.read() else 1)\"")
    words = ["until", health, ">/dev/null", "2>&1", ";", "do", "echo", go_quote("Waiting ..."), ";", "sleep", "2",
             ";", "done", ";",
             "if", "!", "ray", "job", "status", "--address", dashboard_url, job_id, ">/dev/null", "2>&1", ";", "then",
             "ray", "job", "submit", "--address", dashboard_url, "--no-wait"]
    if spec.get("runtimeEnvYAML"):
        words += ["--runtime-env-json", go_quote(json.dumps(yaml.safe_load(spec["runtimeEnvYAML"]), separators=(",", ":")))]
    words += ["--submission-id", job_id]
    if spec.get("entrypointNumCpus"):
        words += ["--entrypoint-num-cpus", f"{float(spec['entrypointNumCpus']):f}"]
    words += ["--", spec["entrypoint"].strip(), ";", "fi", ";", "ray", "job", "logs", "--address", dashboard_url,
              "--follow", job_id]
    return " ".join(words)


FAKE_RAY = """#!{python}
import json, subprocess, sys
args = sys.argv[1:]
if args[:2] == ["job", "status"]:
    sys.exit(1)  # not submitted yet
if args[:2] == ["job", "logs"]:
    sys.exit(0)
assert args[:2] == ["job", "submit"], args
from ray.dashboard.modules.job import cli


class RecordingClient:
    def submit_job(self, *, entrypoint, runtime_env, **options):
        with open({record!r}, "w") as handle:
            json.dump({{"entrypoint": entrypoint, "runtime_env": runtime_env}}, handle)
        # What Ray's job supervisor does with the entrypoint string.
        subprocess.run(entrypoint, shell=True, check=True)
        return options["submission_id"]

    def get_version(self):
        return "1"


cli._get_sdk_client = lambda *args, **kwargs: RecordingClient()
cli.job_cli_group.main(args=args[1:], prog_name="ray job", standalone_mode=True)
"""

FAKE_PROGRAM = """#!{python}
import json, sys
if sys.argv[1:2] == ["-c"]:
    sys.exit(0)  # the submitter's health check
with open({record!r}, "w") as handle:
    json.dump(sys.argv[1:], handle)
"""


def test_submitter_keeps_entrypoint_quoting(tmp_path):
    job = rayjob()
    job["spec"]["entrypoint"] += " --set " + shlex.quote(SPECIAL_ARGUMENT)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    submit_record, program_record = tmp_path / "submitted.json", tmp_path / "argv.json"
    for name, template, record in (("ray", FAKE_RAY, submit_record), ("python", FAKE_PROGRAM, program_record),
                                   ("stalwart", FAKE_PROGRAM, program_record)):
        (stubs / name).write_text(template.format(python=sys.executable, record=str(record)), encoding="utf-8")
        (stubs / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}

    script = submitter_script(job, "http://stalwart-llama-demo-head-svc.default.svc.cluster.local:8265")
    result = subprocess.run(["/bin/bash", "-ce", "--", script], env=env, capture_output=True, text=True, timeout=120,
                            check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    submitted = json.loads(submit_record.read_text(encoding="utf-8"))
    assert submitted["runtime_env"] == yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    argv = json.loads(program_record.read_text(encoding="utf-8"))
    assert argv == shlex.split(job["spec"]["entrypoint"])[1:]
    assert argv[-2:] == ["--set", SPECIAL_ARGUMENT]
