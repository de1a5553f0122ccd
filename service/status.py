"""Gateway health for /health and the system page: free disk against the watermark, which
components sent a heartbeat lately, and recent association refusals.

Call ``gateway_status(settings)``; it returns a JSON-ready dict and never raises for a missing
job store (it reports it instead). ``disk_status(settings)`` is the part the SCP uses for
back-pressure.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.config import Settings
from common.jobstore import queries
from common.jobstore.db import session_scope

HEARTBEAT_STALE_S = 30.0


def disk_status(settings: Settings) -> dict[str, Any]:
    """Free space on the volume holding the spool, against ``disk_watermark_mb``."""
    path = Path(settings.data_dir)
    probe = path if path.exists() else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free_mb = usage.free / (1024 * 1024)
    return {
        "path": str(path),
        "free_mb": round(free_mb, 1),
        "total_mb": round(usage.total / (1024 * 1024), 1),
        "watermark_mb": settings.disk_watermark_mb,
        "ok": free_mb >= settings.disk_watermark_mb,
    }


def gateway_status(settings: Settings) -> dict[str, Any]:
    """Overall gateway status: {"ok", "disk", "accepting", "components", "recent_rejections"}."""
    disk = disk_status(settings)
    now = datetime.now(UTC)
    components: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    store_error = None
    try:
        with session_scope(settings.effective_database_url) as s:
            for hb in queries.heartbeats(s):
                at = hb.at if hb.at.tzinfo else hb.at.replace(tzinfo=UTC)
                age = (now - at).total_seconds()
                components.append(
                    {
                        "component": hb.component,
                        "instance": hb.instance,
                        "age_s": round(age, 1),
                        "alive": age < HEARTBEAT_STALE_S,
                        "info": hb.info or {},
                    }
                )
            for ev in queries.recent_scp_events(s, limit=20, kind="rejected"):
                rejections.append(
                    {"at": ev.at.isoformat(), "calling_aet": ev.calling_aet, "peer": ev.peer, "reason": ev.reason}
                )
    except Exception as exc:  # noqa: BLE001 - health must answer even when the store is down
        store_error = f"job store unavailable: {exc}"
    scp_alive = any(c["component"] == "scp" and c["alive"] for c in components)
    return {
        "ok": disk["ok"] and store_error is None,
        "accepting": disk["ok"] and scp_alive,
        "disk": disk,
        "components": components,
        "recent_rejections": rejections,
        "error": store_error,
    }
