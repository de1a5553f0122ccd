"""The Dockerfile's CPU targets built for real: podman on a local Debian base (issue 19).

No registry of base images answers on the development machine, so deploy/images/build.sh makes the
base with ``debootstrap --variant=minbase bookworm`` (the Debian mirror of the machine's apt sources),
imports it into podman and builds the targets with ``podman build --isolation=chroot``. This sandbox
refuses ``podman run``, so the checks run inside the build: every runtime target ends with
deploy/images/smoke_check.py as a RUN step (``synthperf --help``, the demo weights loaded through the
registry with their sha256 verified, ``alembic upgrade head`` on a throwaway SQLite file), and a failed
check fails the build. The check leaves what it found in the image (/opt/synthperf/smoke.json); this
test mounts the built image (``podman image mount``, no container) and compares that with the source
tree, so it holds even when the check's layer came from the cache (same inputs, same result).

What each form covers:

* small (``make test``, SYNTHPERF_SLOW_SCALE=small): ``service`` and ``worker-cpu`` built by build.sh
  with its cache under var/images (the rootfs tarball and podman's layer store, shared with
  ``make images``). With that cache warm it costs seconds (about 13 s when nothing changed, 30 s
  after a code change: the wheel, its install and the smoke check are rebuilt, the 2.2 GB dependency
  layer is not). The first run on a fresh machine has no cache and pays the cold build (debootstrap,
  Python and dcmtk from Debian, every dependency from the package index: 453 s on 2 loaded cores; figures in
  docs/operations.md, "Images").
* full (SYNTHPERF_SLOW_SCALE=full): the same two targets from nothing in a temporary folder
  (debootstrap, import, every layer built anew), so no cached layer can hide a step that no longer
  works, such as a dependency that stopped installing.

The CUDA target (``worker-gpu``) is not built here: its NVIDIA base image cannot be fetched.

Not slow: the smoke check itself, run on this machine's venv, fails on weights whose sha256 does not
match and on a weights folder without its ``.sha256`` file (the defect it found in the wheel).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, _missing, small_scale

BUILD = REPO_ROOT / "deploy" / "images" / "build.sh"
SMOKE = REPO_ROOT / "deploy" / "images" / "smoke_check.py"
DEMO = REPO_ROOT / "models" / "weights" / "demo"
TARGETS = ("service", "worker-cpu")
TAG = "test"
#: a cold build (debootstrap + all dependencies) on 2 shared cores took about 6-7 minutes
BUILD_TIMEOUT_S = 1500


def podman_cmd(images_dir: Path) -> list[str]:
    return ["podman", "--root", str(images_dir / "storage"), "--runroot", str(images_dir / "run")]


@pytest.fixture(scope="module")
def image_tools() -> None:
    """podman and debootstrap, installed from Debian when missing (only this test and `make images`
    need them)."""
    proc = subprocess.run(["bash", str(REPO_ROOT / "deploy" / "dev" / "ensure_image_tools.sh")],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not shutil.which("podman") or not shutil.which("debootstrap"):
        _missing(f"podman/debootstrap missing and not installable: {proc.stderr.strip()[-1500:]}")


@pytest.fixture(scope="module")
def built(image_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Builds the CPU targets; yields the images folder (podman store) they are in."""
    if small_scale():
        images_dir = REPO_ROOT / "var" / "images"
    else:
        images_dir = tmp_path_factory.mktemp("images-cold")
    log = tmp_path_factory.mktemp("images-log") / "build.log"
    env = {**os.environ, "SYNTHPERF_IMAGES_DIR": str(images_dir), "SYNTHPERF_IMAGE_TAG": TAG}
    with open(log, "w") as out:
        proc = subprocess.run(["bash", str(BUILD), *TARGETS], stdout=out, stderr=subprocess.STDOUT,
                              env=env, timeout=BUILD_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"build.sh {' '.join(TARGETS)} exited {proc.returncode}; last lines of {log}:\n"
                    + "\n".join(log.read_text().splitlines()[-40:]))
    yield images_dir
    if not small_scale():  # a cold store is only for this run: its layers are gigabytes
        subprocess.run([*podman_cmd(images_dir), "rmi", "--all", "--force"], capture_output=True, timeout=300)
        shutil.rmtree(images_dir, ignore_errors=True)


def image_file(images_dir: Path, image: str, path: str) -> str | None:
    """The text of ``path`` in the image's root filesystem (None when absent), read through a mount
    of the image: no container is started."""
    pod = podman_cmd(images_dir)
    root = subprocess.run([*pod, "image", "mount", image], capture_output=True, text=True, timeout=120)
    assert root.returncode == 0, root.stderr
    try:
        f = Path(root.stdout.strip()) / path.lstrip("/")
        return f.read_text() if f.is_file() else None
    finally:
        subprocess.run([*pod, "image", "unmount", image], capture_output=True, timeout=120)


def image_config(images_dir: Path, image: str) -> dict:
    proc = subprocess.run([*podman_cmd(images_dir), "image", "inspect", image],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(BUILD_TIMEOUT_S + 300)
@pytest.mark.parametrize("target", TARGETS)
def test_cpu_target_builds_on_the_local_base_and_passes_its_checks(built: Path, target: str):
    from cli.main import SUBCOMMANDS
    from common.jobstore.queries import head_revision

    image = f"synthperf-{target}:{TAG}"
    smoke = image_file(built, image, "/opt/synthperf/smoke.json")
    assert smoke is not None, f"{image}: no /opt/synthperf/smoke.json: the smoke check did not run in the build"
    found = json.loads(smoke)

    # 1. synthperf --help in the image lists the same subcommands as the source tree
    assert found["subcommands"] == list(SUBCOMMANDS)
    # 2. the demo weights' sha256, verified by load_weights in the build, is the released one
    assert found["weights"]["model"] == "demo"
    assert found["weights"]["sha256"] == (DEMO / "model.safetensors.sha256").read_text().split()[0]
    # 3. Alembic reached the head of the migrations in this tree
    assert found["migrations"]["revision"] == head_revision()

    # built on the local Debian base: bookworm's own Python 3.11 in /opt/venv, not python:3.11-slim's
    assert found["python"].startswith("3.11.")
    assert (image_file(built, image, "/etc/debian_version") or "").startswith("12.")
    assert image_file(built, image, "/usr/local/bin/python3") is None

    inspected = image_config(built, image)
    cfg = inspected["Config"]
    assert cfg["User"] == "synthperf"
    assert cfg["Entrypoint"] == ["/usr/bin/tini", "--"]
    assert "/data" in cfg["Volumes"]
    if target == "service":
        assert cfg["Cmd"] == ["synthperf", "serve", "--no-worker"]
        assert {"11112/tcp", "8080/tcp"} <= set(cfg["ExposedPorts"])
        # podman reports the Docker-format health check beside Config
        assert "/health" in " ".join(inspected["Healthcheck"]["Test"])
    else:
        assert cfg["Cmd"][:3] == ["celery", "-A", "worker.celery_app"]
        assert cfg["Cmd"][cfg["Cmd"].index("-Q") + 1] == "cpu"


def run_smoke(tmp_path: Path, weights: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYNTHPERF_MODEL_NAME": str(weights), "SYNTHPERF_SMOKE_OUT": str(tmp_path / "smoke.json"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([sys.executable, str(SMOKE)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("damage", ["flipped byte", "no sha256 file"])
def test_smoke_check_fails_on_weights_it_cannot_trust(tmp_path: Path, damage: str):
    weights = tmp_path / "weights"
    shutil.copytree(DEMO, weights)
    if damage == "flipped byte":
        data = bytearray((weights / "model.safetensors").read_bytes())
        data[-1] ^= 0x01  # the last tensor byte: the file still parses, only its digest differs
        (weights / "model.safetensors").write_bytes(bytes(data))
        reason = "sha256 mismatch"
    else:
        (weights / "model.safetensors.sha256").unlink()
        reason = "model.safetensors.sha256: missing"
    proc = run_smoke(tmp_path, weights)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "smoke check FAILED" in proc.stderr and reason in proc.stderr
    assert not (tmp_path / "smoke.json").exists()
