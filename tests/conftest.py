"""Shared fixtures: a real S3-compatible server on 127.0.0.1 and a fresh bucket per test."""

import os

# Must run before anything imports ray: it makes a local Ray cluster bind to 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from s3_server import MotoServer  # noqa: E402

# Dummy values: moto accepts any credentials. They are set in the environment,
# as a real run would set them, and never passed in storage options.
TEST_AWS_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "stalwart-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "stalwart-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Settings that could send test traffic to a real account or endpoint.
CLEARED_AWS_VARIABLES = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def aws_test_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Set dummy AWS credentials for the session and hide the user's AWS config files.

    Processes started later (moto, the ranks of dist_helpers) get these variables.
    """
    missing_file = str(tmp_path_factory.mktemp("aws") / "absent")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in TEST_AWS_ENVIRONMENT.items():
            patch.setenv(name, value)
        for name in CLEARED_AWS_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv("AWS_CONFIG_FILE", missing_file)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", missing_file)
        no_proxy = os.environ.get("NO_PROXY", "")
        patch.setenv("NO_PROXY", ",".join(filter(None, [no_proxy, "127.0.0.1", "localhost"])))
        yield


@pytest.fixture(scope="session")
def s3_server(aws_test_environment: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A moto S3 server shared by the session; use ``server.storage_options()`` to reach it."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_s3_server(aws_test_environment: None, tmp_path: Path) -> Iterator[MotoServer]:
    """A moto S3 server for one test, which may stop or restart it."""
    server = MotoServer(tmp_path / "moto-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: MotoServer) -> Iterator[str]:
    """A new, empty bucket on the session server, deleted after the test."""
    name = s3_server.create_bucket()
    yield name
    s3_server.filesystem().rm(name, recursive=True)
