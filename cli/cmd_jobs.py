"""``synthperf jobs [--data-dir DIR] [--json]``: the jobs and their states, from the job store."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("jobs", help="list jobs and their states", description=__doc__)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--config", default=None, help="YAML settings file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=run)


def jobs_as_dicts(database_url: str, limit: int = 100) -> list[dict[str, Any]]:
    from common.jobstore import queries
    from common.jobstore.db import session_scope

    with session_scope(database_url) as s:
        return [
            {
                "id": j.id,
                "study_uid": st.study_uid,
                "accession_number": st.accession_number,
                "version": j.version,
                "state": j.state,
                "trigger": j.trigger,
                "instances": j.instance_count,
                "stage": j.current_stage,
                "progress": j.progress,
                "supersedes": j.supersedes_job_id,
                "created_at": j.created_at.isoformat() if j.created_at else None,
                "finished_at": j.finished_at.isoformat() if j.finished_at else None,
                "error": j.error,
            }
            for j, st in queries.list_jobs(s, limit)
        ]


def run(args: argparse.Namespace) -> int:
    from common.config import SettingsError, load_settings
    from common.jobstore.queries import init_db

    try:
        settings = load_settings(args.config, data_dir=args.data_dir)
    except SettingsError as exc:
        print(f"synthperf jobs: {exc}", file=sys.stderr)
        return 2
    url = settings.effective_database_url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        print(f"no job store at {url[len('sqlite:///'):]}: is --data-dir right?", file=sys.stderr)
        return 1
    init_db(url)
    rows = jobs_as_dicts(url, args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no jobs")
        return 0
    print(f"{'ID':>5} {'VER':>3} {'STATE':<13} {'TRIGGER':<15} {'INST':>5} {'CREATED':<20} STUDY")
    for r in rows:
        created = (r["created_at"] or "")[:19].replace("T", " ")
        print(f"{r['id']:>5} {r['version']:>3} {r['state']:<13} {r['trigger']:<15} {r['instances']:>5} "
              f"{created:<20} ...{r['study_uid'][-24:]}")
    return 0
