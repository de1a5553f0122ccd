"""What the system page and /readyz need beyond the job store: queues, disk, versions.

Queue depth is read from the broker itself (Redis LLEN, or the files of the filesystem broker);
workers and the SCP report themselves through Heartbeat rows (common.jobstore.dashboard_queries).
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common.config import Settings
from common.queue import QUEUE_CPU, QUEUE_GPU

QUEUES = (QUEUE_CPU, QUEUE_GPU)


def queue_depths(settings: Settings) -> dict[str, Any]:
    """Messages waiting per queue; ``error`` says why when the broker cannot be read."""
    url = settings.effective_broker_url
    depths: dict[str, int | None] = {q: None for q in QUEUES}
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
            try:
                for q in QUEUES:
                    depths[q] = int(client.llen(q))
            finally:
                client.close()
            kind = "redis"
        elif url.startswith("filesystem://"):
            folder = settings.broker_dir / "in"
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
            for q in QUEUES:
                # kombu names each message "<ms>_<uuid>.<queue>.msg"
                depths[q] = sum(1 for n in names if n.partition(".")[2] == f"{q}.msg")
            kind = "filesystem"
        else:
            return {"broker": url.split("://", 1)[0], "queues": depths, "error": "queue depth not readable for this broker"}
    except Exception as exc:  # noqa: BLE001 - the page must render even when the broker is down
        return {"broker": url.split("://", 1)[0], "queues": depths, "error": f"broker unreachable: {exc}"}
    return {"broker": kind, "queues": depths, "error": None}


_ping_cache: dict[str, tuple[float, list[str] | None]] = {}
_ping_lock = threading.Lock()


def celery_workers(settings: Settings, celery_app: Any, ttl_s: float = 5.0) -> list[str] | None:
    """Worker node names answering a broadcast ping (Redis broker only; None when not askable).

    Cached for a few seconds: the system page polls, and a ping waits for its timeout.
    """
    url = settings.effective_broker_url
    if not url.startswith(("redis://", "rediss://")):
        return None
    now = time.monotonic()
    with _ping_lock:
        hit = _ping_cache.get(url)
        if hit and now - hit[0] < ttl_s:
            return hit[1]
    try:
        replies = celery_app.control.ping(timeout=0.5) or []
        names: list[str] | None = sorted(name for reply in replies for name in reply)
    except Exception:  # noqa: BLE001 - broker down: the queue tile says so
        names = None
    with _ping_lock:
        _ping_cache[url] = (now, names)
    return names


def disk_status(settings: Settings) -> dict[str, Any]:
    """Free space where the spool lives, against the SCP's refusal watermark."""
    path = Path(settings.data_dir)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free_mb = usage.free / 2**20
    return {
        "path": str(path),
        "free_mb": round(free_mb, 1),
        "total_mb": round(usage.total / 2**20, 1),
        "watermark_mb": settings.disk_watermark_mb,
        "above_watermark": free_mb >= settings.disk_watermark_mb,
    }


def software_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform(terse=True)}
    for dist in ("synthperf", "pynetdicom", "pydicom", "highdicom", "torch", "monai", "celery", "fastapi"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def inference_runtimes(settings: Settings, limit: int = 8) -> list[dict[str, Any]]:
    """The workers' inference-path measurements (data_dir/runtime/runtime-*.json), newest first,
    one per machine and device (the newest; older ones were made with other versions or threads).

    Written by the worker's model (models.tmax_ddpm.runtime) when it measured which path is fastest on
    its machine; read here as plain JSON so the service needs nothing of the model. Each entry: the
    host, CPU capability, chosen path, and every candidate's time and max |dTmax| against fp32.
    """
    import json

    folder = settings.runtime_dir
    if not folder.is_dir():
        return []
    out = []
    seen: set[tuple[str, str]] = set()
    for path in sorted(folder.glob("runtime-*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        if len(out) >= limit:
            break
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        machine = (str(d.get("host", "?")), str(d.get("device", "?")))
        if machine in seen:  # an older measurement of the same machine (other versions or threads): history
            continue
        seen.add(machine)
        trials = [t for t in d.get("trials", []) if isinstance(t, dict)]
        out.append({
            "host": d.get("host", "?"), "device": d.get("device", "?"), "path": d.get("path", "?"),
            "capability": d.get("capability", "?"), "native_bf16": bool(d.get("native_bf16")), "cpu": d.get("cpu", ""),
            "threads": d.get("threads"), "measured_at": d.get("measured_at", ""), "speedup": d.get("speedup_vs_fp32"),
            "tolerance_s": d.get("tolerance_s"), "skipped": d.get("skipped", {}),
            "trials": [{"path": t.get("path"), "ok": t.get("ok"), "probe_s": t.get("probe_s"),
                        "study_s": t.get("study_s_estimate"), "setup_s": t.get("setup_s"),
                        "max_abs_tmax_s": t.get("max_abs_tmax_s"), "within": t.get("within_tolerance"),
                        "error": t.get("error", "")} for t in trials],
        })
    return out
