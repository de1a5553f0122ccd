"""Stroke first: N phantom studies sent at once to one worker; time to the first and the last result.

Issue 16 measured, with ten studies and one worker, the first result in PACS 284 s after sending and
the last at 326 s, against 34 s for one study alone: every job ran each stage before any job moved
on. This bench stands up the end-to-end world of bench/e2e.py (storescu -> our SCP -> completion ->
one Celery worker, concurrency 1, on Redis -> pipeline -> C-STORE into a real Orthanc), then

1. sends one study alone: the single-study time (reference, same run);
2. sends N different phantom studies at once (one storescu each, in parallel) and records, per study,
   the time from the start of sending to its last result object accepted by Orthanc.

It prints first, median and last against the single-study time, with the CPU capability and core
count. ``--compare`` runs step 2 again with ``chain_stages`` off (every task handed off through the
broker, the behaviour before issue 16) in a fresh service. ``--workers-compare`` runs step 2 again in
a fresh service with two workers (P6, issue 19): the throughput ratio is the one-worker batch's last
result time over the two-worker batch's, same studies, same run, same machine.

    python -m bench.concurrency [--studies 3] [--studies 10 --compare] [--matrix 64] [--steps 2]
    python -m bench.concurrency --studies 10 --workers-compare   # P6: two workers against one (issue 19)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path


def _aware(d: datetime) -> datetime:
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def make_studies(folder: Path, n: int, matrix: int) -> list[Path]:
    from phantom.api import make_case, write_dicom_study

    out = []
    for i in range(n):
        case = make_case(100 + i, matrix=matrix)
        out.append(Path(write_dicom_study(case, folder / f"s{i}", "siemens", enhanced=False)))
    return out


def results_by_study(settings, study_count: int, timeout_s: float, service) -> dict[str, datetime]:
    """Wait until ``study_count`` studies have a final latest job; study UID -> last delivery time."""
    from sqlalchemy import func, select

    from common.jobstore.db import session_scope
    from common.jobstore.models import Delivery, Job, JobState, Study

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope(settings.effective_database_url) as s:
            latest = {}
            for job in s.scalars(select(Job).order_by(Job.id)):
                latest[job.study_id] = job
            final = [j for j in latest.values() if j.state in JobState.FINAL]
            if len(final) >= study_count:
                bad = [(j.id, j.state, j.error) for j in final if j.state != JobState.DONE]
                if bad:
                    raise RuntimeError(f"jobs did not finish: {bad}\n{service.logs()}")
                out = {}
                for j in final:
                    last = s.scalar(select(func.max(Delivery.delivered_at)).where(Delivery.job_id == j.id))
                    out[s.get(Study, j.study_id).study_uid] = _aware(last)
                return out
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {study_count} studies\n{service.logs()}")


def run_batch(tmp: Path, name: str, studies: list[Path], orthanc, redis_url: str, model: str, args,
              chain: bool, warmup: Path, single: Path | None, workers: int = 1) -> tuple[float | None, list[float]]:
    """One fresh service with ``workers`` Celery workers (concurrency 1 each, both queues); a warm-up
    study (not timed: the first synthesis in a process may measure the inference paths), optionally
    the single study, then ``studies`` at once.

    Returns (single-study seconds or None, per-study seconds of the concurrent batch, sorted).
    """
    import sys

    from tests.integration.harness import PrivateRedis, storescu
    from tests.integration.test_e2e import Service

    broker = PrivateRedis(tmp / f"redis_{name}", redis_url)
    service = Service(tmp / f"svc_{name}", broker.start(), orthanc, model, ddim_steps=args.steps,
                      samples=args.samples, stable_age_s=args.stable_age, chain_stages=chain)
    service.start()
    for k in range(2, workers + 1):  # P6 (issue 19): more workers on the same machine
        service.spawn(f"worker{k}", [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker",
                                     "-Q", "cpu,gpu", "--concurrency", "1", "--disable-prefetch", "--loglevel",
                                     "INFO", "--without-gossip", "--without-mingle", "-n", f"w{k}@%h"])
    logs = [service.folder / "worker.log"] + [service.folder / f"worker{k}.log" for k in range(2, workers + 1)]
    try:
        deadline = time.monotonic() + 180  # steady state: every pool process has loaded the model
        while time.monotonic() < deadline and not all(
                lg.is_file() and "model preloaded" in lg.read_text(errors="replace") for lg in logs):
            time.sleep(0.5)
        settings = service.settings
        storescu(warmup, service.scp_port)
        results_by_study(settings, 1, 900, service)
        single_s = None
        done_before = 1
        if single is not None:
            t0 = datetime.now(UTC)
            storescu(single, service.scp_port)
            last = results_by_study(settings, 2, 900, service)
            single_s = (max(last.values()) - t0).total_seconds()
            done_before = 2
        t0 = datetime.now(UTC)
        errors: list[BaseException] = []

        def send(study: Path) -> None:
            try:
                storescu(study, service.scp_port)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(st,)) for st in studies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        last = results_by_study(settings, done_before + len(studies), 300 + 120 * len(studies), service)
        last = {uid: t for uid, t in last.items() if t >= t0}
        return single_s, sorted((t - t0).total_seconds() for t in last.values())
    finally:
        service.stop()
        broker.stop()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=3, help="concurrent studies (issue 16 used 10)")
    ap.add_argument("--matrix", type=int, default=64, help="phantom in-plane matrix (128 = clinical-like)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--stable-age", type=float, default=2.0, help="completion quiet time (s)")
    ap.add_argument("--compare", action="store_true", help="also run the batch with chain_stages off")
    ap.add_argument("--workers-compare", action="store_true",
                    help="P6: run the batch with one worker, then with two, on the same studies (issue 19)")
    ap.add_argument("--redis", default=os.environ.get("SYNTHPERF_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    args = ap.parse_args(argv)
    if args.studies < 1:
        ap.error("--studies must be at least 1")

    import torch

    from bench.e2e import model_ref
    from tests.integration.harness import OrthancServer

    tmp = Path(tempfile.mkdtemp(prefix="bench_conc_"))
    try:
        studies = make_studies(tmp / "studies", args.studies + 2, args.matrix)  # warm-up, single, batch
        model, model_note = model_ref(tmp)
        orthanc = OrthancServer(tmp / "orthanc", verbose=False)
        orthanc.start()
        try:
            single_s, chained = run_batch(tmp, "chained", studies[2:], orthanc, args.redis, model, args, True,
                                          studies[0], studies[1])
            handoff = None
            two_workers = None
            if args.workers_compare:
                import httpx

                for oid in orthanc.instances():  # the same studies again: let the PACS store them anew
                    httpx.delete(f"{orthanc.url}/instances/{oid}", timeout=10)
                _, two_workers = run_batch(tmp, "two_workers", studies[2:], orthanc, args.redis, model, args, True,
                                           studies[0], None, workers=2)
            if args.compare:
                import httpx

                for oid in orthanc.instances():  # the same studies again: let the PACS store them anew
                    httpx.delete(f"{orthanc.url}/instances/{oid}", timeout=10)
                _, handoff = run_batch(tmp, "handoff", studies[2:], orthanc, args.redis, model, args, False,
                                       studies[0], None)
        finally:
            orthanc.stop()
        cpu = torch.backends.cpu.get_cpu_capability()
        print(f"concurrency: {args.studies} phantom studies (matrix {args.matrix}) at once, one worker "
              f"(concurrency 1, queues cpu+gpu), steps={args.steps} samples={args.samples}; model: {model_note}")
        print(f"  CPU capability {cpu}, {os.cpu_count()} cores; torch {torch.__version__}")
        print(f"  single study alone (reference):        {single_s:7.1f} s")

        def report(label: str, times: list[float]) -> dict:
            med = statistics.median(times)
            print(f"  {label}: first {times[0]:7.1f} s ({times[0] / single_s:4.2f}x single)  median {med:7.1f} s "
                  f"({med / single_s:4.2f}x)  last {times[-1]:7.1f} s ({times[-1] / single_s:4.2f}x)")
            return {"first_s": times[0], "median_s": med, "last_s": times[-1], "all_s": times}

        out = {"single_s": single_s, "cpu": cpu, "cores": os.cpu_count(), "studies": args.studies,
               "chained": report("stroke first (chain_stages on) ", chained)}
        if handoff is not None:
            out["handoff"] = report("hand-off (chain_stages off)    ", handoff)
        if two_workers is not None:
            out["two_workers"] = report("two workers (chain_stages on)  ", two_workers)
            ratio = chained[-1] / two_workers[-1]  # same studies, same run: throughput = studies / last result
            out["p6_throughput_ratio"] = ratio
            print(f"  P6 throughput two workers / one worker: {ratio:4.2f}x ({args.studies} studies: last result "
                  f"{chained[-1]:.1f} s with one worker, {two_workers[-1]:.1f} s with two; "
                  f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end)")
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
