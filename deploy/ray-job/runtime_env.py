"""Print the runtime environment of a Stalwart job as JSON, for `ray job submit --runtime-env /dev/stdin`.

It reads runtime-env.yaml beside this file and adds, as env_vars, the non-secret
storage settings (region and endpoint) that are set in the caller's environment.

Credentials are never added. Ray stores a job's runtime environment in the
cluster's metadata, where `ray job list`, the dashboard and the job API show it
to anyone who can reach the cluster. The cluster's nodes must have their own
credentials instead: in the environment of `ray start`, from a Kubernetes Secret
(deploy/kuberay) or from a cloud role. docs/operations.md has the details.

Needs only PyYAML, which Ray itself depends on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

# The settings the driver passes on to its workers (service.driver.WORKER_ENV_KEYS), less
# AWS_PROFILE: a profile names a section of the caller's ~/.aws files, which the cluster lacks.
# A test keeps the two lists in step.
FORWARDED_VARIABLES = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
TEMPLATE = Path(__file__).with_name("runtime-env.yaml")


def build_runtime_env(environ: dict[str, str], template: Path = TEMPLATE) -> dict:
    runtime_env = yaml.safe_load(template.read_text(encoding="utf-8")) or {}
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.update({name: environ[name] for name in FORWARDED_VARIABLES if environ.get(name)})
    runtime_env["env_vars"] = env_vars
    return runtime_env


if __name__ == "__main__":
    json.dump(build_runtime_env(dict(os.environ)), sys.stdout)
    sys.stdout.write("\n")
