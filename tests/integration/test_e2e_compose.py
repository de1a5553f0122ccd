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


def test_docker_compose_config_validates():
    docker = shutil.which("docker")
    if not docker:
        pytest.skip("no docker client installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"docker client has no compose plugin: {probe.stderr.strip()[:100]}")
    env = {**os.environ, "POSTGRES_PASSWORD": "test", "SYNTHPERF_SECRET_KEY": "test"}
    proc = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True,
                          text=True, timeout=60, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr


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
