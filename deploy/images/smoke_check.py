"""Checks an image at build time, as a RUN step (no container is ever started to check it).

Why at build time: an image whose entry point, weights or schema migrations are broken must fail its
build, on a Docker host as on this machine (where `podman run` is refused, see docs/operations.md,
"Images"). Three checks, each as the service does it:

1. ``synthperf --help`` exits 0 and lists its subcommands (every cli module imports).
2. The model the image is configured for (``SYNTHPERF_MODEL_NAME``, default ``demo``) resolves through
   the registry and loads with ``load_weights``: sha256 against ``model.safetensors.sha256``, the config
   hash in the tensor file, every tensor fitting the network.
3. ``init_db`` (Alembic ``upgrade head``) on a throwaway SQLite file reaches the packaged head.

The findings go to stdout and to OUT (a small JSON file in the image) so that a test can read what
was checked from the image itself, even when the build step came from the layer cache.
Exit status 1 with the reason on stderr when any check fails.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(os.environ.get("SYNTHPERF_SMOKE_OUT", "/opt/synthperf/smoke.json"))


def check_help() -> list[str]:
    proc = subprocess.run(["synthperf", "--help"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"synthperf --help exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    m = re.search(r"\{([\w,-]+)\}", proc.stdout)
    if not m:
        raise RuntimeError(f"synthperf --help lists no subcommands:\n{proc.stdout}")
    return m.group(1).split(",")


def check_weights() -> dict[str, str]:
    from models.registry import resolve_members
    from models.tmax_ddpm.checkpoint import SHA_FILE, load_weights, sha256_file

    name = os.environ.get("SYNTHPERF_MODEL_NAME", "demo")
    folders = resolve_members(name)  # every network the name serves (an ensemble has several)
    for folder in folders:
        load_weights(folder)  # raises CheckpointError on a sha256, config or tensor mismatch
    return {"model": name, "folder": str(folders[0]), "sha256": sha256_file(folders[0] / "model.safetensors"),
            "members": [{"folder": str(f), "sha256": sha256_file(f / "model.safetensors")} for f in folders],
            "expected_from": SHA_FILE}


def check_migrations() -> dict[str, str]:
    from common.jobstore.queries import head_revision, init_db

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/smoke.db"
        reached = init_db(url)
    head = head_revision()
    if reached is None or reached != head:
        raise RuntimeError(f"alembic upgrade head reached {reached!r}, the packaged head is {head!r}")
    return {"revision": reached}


def main() -> int:
    try:
        found = {
            "subcommands": check_help(),
            "weights": check_weights(),
            "migrations": check_migrations(),
            "python": sys.version.split()[0],
        }
    except Exception as exc:  # every failure ends the build with its reason
        print(f"smoke check FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(found, indent=2, sort_keys=True) + "\n")
    print("smoke check passed:", json.dumps(found, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
