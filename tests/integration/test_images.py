"""The Dockerfile's CPU targets built for real: podman on a local Debian base (issue 19).

No registry of base images answers on the development machine, so deploy/images/build.sh makes the
base with ``debootstrap --variant=minbase bookworm`` (the Debian mirror of the machine's apt sources),
imports it into podman and builds stages with ``podman build --isolation=chroot``. This sandbox
refuses ``podman run``, so nothing is checked in a container: every runtime target ends with
deploy/images/smoke_check.py as a RUN step (``synthperf --help``, the demo weights loaded through the
registry with their sha256 verified, ``alembic upgrade head`` on a throwaway SQLite file), a failed
check fails the build, and this test reads what was built through ``podman image mount``.

What each form covers:

* small (``make test``, SYNTHPERF_SLOW_SCALE=small): no podman on a fresh machine. The wheel is built
  on the host the way the Dockerfile's ``build`` stage builds it (its COPY lines, its ``pip wheel``
  command; 4 s) and opened: the demo weights with their ``.sha256`` (and that it matches them) and the
  Alembic migrations, byte for byte as in the source tree, which the smoke check once caught missing;
  that the wheel's dependencies are what deploy/images/requirements.py computes from pyproject.toml, and
  that this is the project's dependency list. Building the cheap stages on a cold debootstrap'd base cost
  105-141 s of make test's 15 minutes, so it moved to the full form. When the store (SYNTHPERF_IMAGES_DIR,
  default var/images, shared with ``make images``) already holds a runtime image whose dependency list
  is today's, its 2.2 GB dependency layer is cached, so the small form also builds the cheap stages and
  both runtime targets (seconds: the wheel, its install and the smoke check) and runs every assertion.
  Otherwise those are skipped, saying so; they never run on a fresh machine in this form.
* full (SYNTHPERF_SLOW_SCALE=full): ``service`` and ``worker-cpu`` from nothing in a temporary folder
  (debootstrap, import, every layer built anew, the smoke check in each build), so no cached layer can
  hide a step that no longer works, such as a dependency that stopped installing; then the runtime
  assertions: the check's findings (/opt/synthperf/smoke.json) against the source tree, the base and
  Python, user, entry point, command, ports, health check; and the cheap stages (the local base, the
  ``requirements`` and ``build`` stages) with the same wheel checks on the wheel built in the image.

The CUDA target (``worker-gpu``) is not built here: its NVIDIA base image cannot be fetched.

Not slow: the smoke check itself, run on this machine's venv, fails on weights whose sha256 does not
match and on a weights folder without its ``.sha256`` file (the defect it found in the wheel).
"""

from __future__ import annotations

import email.parser
import functools
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from models.registry import resolve_members
from tests.conftest import REPO_ROOT, _missing, small_scale

BUILD = REPO_ROOT / "deploy" / "images" / "build.sh"
SMOKE = REPO_ROOT / "deploy" / "images" / "smoke_check.py"
REQUIREMENTS = REPO_ROOT / "deploy" / "images" / "requirements.py"
DEMO = REPO_ROOT / "models" / "weights" / "demo"
MIGRATIONS = REPO_ROOT / "common" / "jobstore" / "migrations"
#: the runtime targets (2.5 GB each, with the smoke check in the build)
TARGETS = ("service", "worker-cpu")
#: the cheap stages: python3 from Debian, the dependency list, our wheel (requirements is built only
#: when named: no other stage of these asks for it)
CHEAP_STAGES = ("requirements", "build")
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
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The images folder (rootfs tarball and podman store) this run builds in: the shared cache in the
    small form, a fresh temporary one in the full form (removed afterwards: its layers are gigabytes)."""
    if small_scale():
        # absolute: podman's store records the path it was created with
        images_dir = Path(os.environ.get("SYNTHPERF_IMAGES_DIR") or REPO_ROOT / "var" / "images").resolve()
    else:
        images_dir = tmp_path_factory.mktemp("images-cold")
    yield images_dir
    if not small_scale():
        subprocess.run([*podman_cmd(images_dir), "rmi", "--all", "--force"], capture_output=True, timeout=300)
        shutil.rmtree(images_dir, ignore_errors=True)


def build(images_dir: Path, stages: tuple[str, ...], log: Path) -> None:
    """deploy/images/build.sh STAGES into images_dir, tagged synthperf-STAGE:test; fails the test with
    the end of its log when the build fails."""
    env = {**os.environ, "SYNTHPERF_IMAGES_DIR": str(images_dir), "SYNTHPERF_IMAGE_TAG": TAG}
    with open(log, "w") as out:
        proc = subprocess.run(["bash", str(BUILD), *stages], stdout=out, stderr=subprocess.STDOUT,
                              env=env, timeout=BUILD_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"build.sh {' '.join(stages)} exited {proc.returncode}; last lines of {log}:\n"
                    + "\n".join(log.read_text().splitlines()[-40:]))


@pytest.fixture(scope="module")
def cheap_built(store: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local base and the requirements and build stages; yields the images folder. Built in the
    full form, or in the small form when the store already holds the runtime images (then they are
    cached and cost seconds); a fresh machine's small form checks the wheel on the host instead."""
    if small_scale() and not cached_runtime_images(store):
        pytest.skip("the small form builds the cheap stages only on a store that holds the runtime images "
                    f"(none with today's dependency list in {store}): a cold debootstrap'd base costs 2 "
                    "minutes; the wheel is checked on the host instead; `make images` or "
                    "SYNTHPERF_SLOW_SCALE=full builds them")
    request.getfixturevalue("image_tools")
    build(store, CHEAP_STAGES, tmp_path_factory.mktemp("images-log") / "build-cheap.log")
    return store


@pytest.fixture(scope="module")
def built(store: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime targets; yields the images folder. The small form builds them only on a store whose
    dependency layer is already cached (see the module docstring)."""
    if small_scale() and not cached_runtime_images(store):
        pytest.skip("the small form builds the runtime targets only when the store already holds their "
                    f"dependency layer (no runtime image with today's dependency list in {store}); "
                    "`make images` or SYNTHPERF_SLOW_SCALE=full builds them")
    request.getfixturevalue("image_tools")
    build(store, TARGETS, tmp_path_factory.mktemp("images-log") / "build-runtime.log")
    return store


@contextmanager
def mounted(images_dir: Path, image: str) -> Iterator[Path]:
    """The image's root filesystem, read-only through a mount: no container is started."""
    pod = podman_cmd(images_dir)
    root = subprocess.run([*pod, "image", "mount", image], capture_output=True, text=True, timeout=120)
    assert root.returncode == 0, root.stderr
    try:
        yield Path(root.stdout.strip())
    finally:
        subprocess.run([*pod, "image", "unmount", image], capture_output=True, timeout=120)


def image_file(images_dir: Path, image: str, path: str) -> str | None:
    """The text of ``path`` in the image (None when absent)."""
    with mounted(images_dir, image) as root:
        f = root / path.lstrip("/")
        return f.read_text() if f.is_file() else None


def image_config(images_dir: Path, image: str) -> dict:
    proc = subprocess.run([*podman_cmd(images_dir), "image", "inspect", image],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[0]


@functools.cache
def requirements_here() -> str:
    """The dependency list as deploy/images/requirements.py computes it from this tree's pyproject.toml
    (once per run: every runtime image and test compares against it)."""
    proc = subprocess.run([sys.executable, str(REQUIREMENTS), str(REPO_ROOT / "pyproject.toml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def cached_runtime_images(images_dir: Path) -> list[str]:
    """Runtime images in the store built from today's dependency list: with one of them, the large
    dependency layer is cached and rebuilding the runtime targets costs seconds, not minutes."""
    if not (images_dir / "storage").is_dir() or not shutil.which("podman"):
        return []
    proc = subprocess.run([*podman_cmd(images_dir), "images", "--format", "{{.Repository}}:{{.Tag}}"],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return []
    names = {f"localhost/synthperf-{t}" for t in TARGETS}
    want = requirements_here()
    return [ref for ref in proc.stdout.split() if ref.rsplit(":", 1)[0] in names
            and image_file(images_dir, ref, "/opt/synthperf/requirements.txt") == want]


def source_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*")
                  if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc")


def wheel_name() -> str:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return f"{re.sub(r'[-_.]+', '_', project['name'])}-{project['version']}-py3-none-any.whl"


def check_wheel(wheel: bytes, listed: str) -> None:
    """What the smoke check once caught missing, read from the wheel: the demo weights with their
    ``.sha256`` (matching them) and the Alembic migrations, byte for byte as in the source tree; and that
    the wheel depends on exactly ``listed``, the dependency list the runtime stages install before it."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    # the requirements stage lists what requirements.py computes from pyproject.toml here
    assert listed == requirements_here()
    assert listed.splitlines() == project["dependencies"]

    with zipfile.ZipFile(io.BytesIO(wheel)) as whl:
        names = set(whl.namelist())
        # the package data an installed synthperf needs: the demo weights with their digest file (the
        # defect the smoke check found) and the Alembic migrations, as in the source tree
        served = resolve_members("demo")  # every network of the served ensemble
        assert served[0] == DEMO
        for f in [*(f for d in served for f in source_files(d)), *source_files(MIGRATIONS)]:
            rel = f.relative_to(REPO_ROOT).as_posix()
            assert rel in names, f"{rel} is not in the wheel"
            assert whl.read(rel) == f.read_bytes(), f"{rel} in the wheel differs from the source tree"
        for d in served:
            weights = d.relative_to(REPO_ROOT).as_posix()
            assert f"{weights}/model.safetensors.sha256" in names
            digest = whl.read(f"{weights}/model.safetensors.sha256").decode().split()[0]
            assert hashlib.sha256(whl.read(f"{weights}/model.safetensors")).hexdigest() == digest
        assert any(n.startswith("common/jobstore/migrations/versions/") and n.endswith(".py") for n in names)
        # the wheel depends on exactly the list the runtime stages install before it (their `pip check`)
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(whl.read(meta_name).decode())
        requires = {str(Requirement(r)) for r in meta.get_all("Requires-Dist") or []
                    if "extra ==" not in r}
        assert requires == {str(Requirement(r)) for r in listed.splitlines()}


def build_stage_sources() -> list[str]:
    """What the Dockerfile's ``build`` stage COPYs into /src (its COPY lines, so that the wheel built
    here is built from what the image's would be)."""
    lines = (REPO_ROOT / "Dockerfile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"FROM\s+\S+\s+AS\s+build\s*$", line, re.I))
    sources: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("FROM "):
            break
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    return sources


def test_wheel_built_as_the_build_stage_does_holds_weights_migrations_and_dependencies(tmp_path: Path):
    """The small form's packaging check, without podman: the build stage's sources and its ``pip wheel``
    command on this machine's venv (4 s, where building the stage on a fresh debootstrap'd base costs
    2 minutes of the 15 that make test has; that build runs in the full form and in ``make images``)."""
    sources = build_stage_sources()
    assert {"pyproject.toml", "common", "models", "cli"} <= set(sources)
    src = tmp_path / "src"
    src.mkdir()
    for name in sources:
        origin = REPO_ROOT / name
        if origin.is_dir():
            shutil.copytree(origin, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-cache-dir", "--no-deps",
                           "--no-build-isolation", "--wheel-dir", str(tmp_path / "wheels"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "wheels").glob("*.whl")) == [wheel_name()]
    check_wheel((tmp_path / "wheels" / wheel_name()).read_bytes(), requirements_here())


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(BUILD_TIMEOUT_S + 300)
def test_wheel_and_dependency_list_build_on_the_local_base(cheap_built: Path):
    with mounted(cheap_built, f"synthperf-build:{TAG}") as root:
        wheels = sorted(p.name for p in (root / "wheels").glob("*.whl"))
        assert wheels == [wheel_name()]
        wheel = (root / "wheels" / wheel_name()).read_bytes()
        # the local bookworm base with Debian's Python 3.11 in /opt/venv, not python:3.11-slim's
        assert (root / "etc" / "debian_version").read_text().startswith("12.")
        assert re.search(r"^version\s*=\s*3\.11\.", (root / "opt/venv/pyvenv.cfg").read_text(), re.M)
        assert not os.path.lexists(root / "usr/local/bin/python3")
    with mounted(cheap_built, f"synthperf-requirements:{TAG}") as root:
        listed = (root / "requirements.txt").read_text()
    check_wheel(wheel, listed)


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
    # the dependencies installed are today's list (the cache-warm small form relies on it)
    assert image_file(built, image, "/opt/synthperf/requirements.txt") == requirements_here()

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
