"""``synthperf repush JOB_ID``: send a job's stored output objects to PACS again.

Dead-lettered (and still pending) deliveries become due now with a fresh retry period; with
``--all`` objects already delivered are sent again too. The stored files are sent as they are —
nothing is re-encoded. Without ``--now`` the push is queued to the workers; with it, it runs here.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("repush", help="re-send a job's results to the configured PACS",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job_id", type=int)
    p.add_argument("--all", action="store_true", help="also re-send objects already delivered")
    p.add_argument("--now", action="store_true", help="push from this process instead of queueing it")
    p.add_argument("--config", default=None, help="YAML settings file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from common.config import load_settings
    from common.jobstore.queries import init_db
    from common.queue import TASK_PUSH, make_celery
    from worker.pipeline.push import push_due, repush

    settings = load_settings(args.config)
    init_db(settings.effective_database_url)
    try:
        n = repush(settings, args.job_id, include_sent=args.all)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if n == 0:
        print(f"job {args.job_id}: nothing to re-send (use --all to re-send delivered objects)")
        return 0
    if args.now:
        report = push_due(settings, args.job_id)
        print(f"job {args.job_id}: {report.sent} sent, {report.pending} pending, {report.dead} dead")
        for err in report.errors[:5]:
            print(f"  {err}", file=sys.stderr)
        return 0 if report.complete and not report.dead else 1
    make_celery(settings).send_task(TASK_PUSH, args=(args.job_id,))
    print(f"job {args.job_id}: {n} object(s) queued for delivery")
    return 0
