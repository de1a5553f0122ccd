"""The deployment files: docker-compose.yml names every service the design needs, the GPU worker
reserves a GPU, the Dockerfile has the three targets; ``docker compose config`` validates the file
when a docker client with compose is installed (skipped with the reason otherwise).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"


def test_compose_has_the_stack():
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"redis", "postgres", "scp", "api", "worker-cpu", "worker-gpu", "orthanc"} <= set(services)
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in gpu["capabilities"]
    assert "-Q" in services["worker-gpu"]["command"] and "gpu" in services["worker-gpu"]["command"]
    assert "cpu" in services["worker-cpu"]["command"]
    assert services["orthanc"]["environment"]["TCP_NODELAY"] == "1"
    env = services["scp"]["environment"]
    assert env["SYNTHPERF_BROKER_URL"].startswith("redis://redis:")
    assert env["SYNTHPERF_DATABASE_URL"].startswith("postgresql+psycopg://")
    # every SYNTHPERF_ variable the stack sets is a real setting
    from common.config import Settings

    for key in env:
        if key.startswith("SYNTHPERF_"):
            assert key[len("SYNTHPERF_"):].lower() in Settings.model_fields, key


def test_dockerfile_has_three_targets():
    text = (REPO_ROOT / "Dockerfile").read_text()
    targets = set(re.findall(r"^FROM .* AS ([\w-]+)$", text, flags=re.M))
    assert {"service", "worker-cpu", "worker-gpu"} <= targets
    assert "download.pytorch.org/whl/cpu" in text and "TORCH_CUDA_INDEX" in text


def compose_command() -> list[str] | None:
    """The compose CLI this machine has: the docker plugin (`docker compose`) or the standalone
    `docker-compose` (Debian's 1.29, which `make test` installs beside a docker client)."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_docker_compose_config_validates(tmp_path):
    if not shutil.which("docker"):
        pytest.skip("no docker client installed")
    compose = compose_command()
    if compose is None:
        if os.environ.get("SYNTHPERF_REQUIRE_TOOLS") == "1":
            pytest.fail("a docker client without compose: make test installs docker-compose (deploy/dev/ensure_tools.sh)")
        pytest.skip("docker client has neither the compose plugin nor docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTHPERF_", "POSTGRES_", "COMPOSE_"))}
    # the documented way: the example env file fills every required variable
    proc = subprocess.run([*compose, "--env-file", str(REPO_ROOT / "deploy/.env.example"), "-f", str(COMPOSE),
                           "config"], capture_output=True, text=True, timeout=60, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["services"]["scp"]["environment"]["SYNTHPERF_DATABASE_URL"].startswith(
        "postgresql+psycopg://synthperf:change-me-postgres@postgres:5432/")
    assert resolved["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    # without the secrets the file refuses to resolve, naming the missing variable
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = subprocess.run([*compose, "--env-file", str(empty), "-f", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO_ROOT)
    assert proc.returncode != 0
    assert "POSTGRES_PASSWORD" in proc.stderr or "SYNTHPERF_SECRET_KEY" in proc.stderr, proc.stderr


def test_compose_commands_exist():
    """The commands the containers run are real: serve's flags parse, the API one-liner compiles."""
    from cli.main import build_parser

    doc = yaml.safe_load(COMPOSE.read_text())
    scp = doc["services"]["scp"]["command"]
    assert scp[0] == "synthperf"
    args = build_parser().parse_args(scp[1:])
    assert args.no_api and args.no_worker
    api = doc["services"]["api"]["command"]
    assert api[:2] == ["python", "-c"]
    compile(api[2], "<api>", "exec")
    assert "create_app" in api[2]
