"""``synthperf serve``: the whole service in one command, with embedded defaults.

In this process: the DICOM SCP, the completion loop and heartbeats (service.gateway), and the
dashboard/API under uvicorn when ``service.api.app`` exists. As a child process: a Celery
worker for queues cpu and gpu when ``worker/celery_app.py`` exists, restarted if it exits.
SIGINT/SIGTERM stop all of it cleanly (the SCP first, so no new instance is accepted while the
rest winds down). One process tree (issue 16): ``<data_dir>/serve.pid`` (an flock) refuses a
second ``serve`` on the same data dir, and a SIGKILL of ``serve`` takes the worker and its pool
with it (parent-death signal), so a restart never finds an orphaned worker beside its new one.
Named gateway replicas (``replica_id``, issue 19) lock ``serve-<replica_id>.pid`` instead, so several
may share one data dir; the job store's replica registry refuses a second gateway on SQLite.
``--demo`` (used by ``make run``) also sends a phantom study to ourselves through
:func:`send_demo_study`.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("synthperf.serve")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the DICOM SCP, completion, API and worker", description=__doc__)
    p.add_argument("--config", default=None, help="YAML settings file (env SYNTHPERF_* still overrides it)")
    p.add_argument("--data-dir", type=Path, default=None, help="spool, job store and outputs (default ./var)")
    p.add_argument("--port", type=int, default=None, help="DICOM port (default 11112)")
    p.add_argument("--aet", default=None, help="our AE title (default SYNTHPERF)")
    p.add_argument("--api-port", type=int, default=None, help="dashboard/API port (default 8080)")
    p.add_argument("--demo", action="store_true", help="send a phantom study to ourselves once up")
    p.add_argument("--no-api", action="store_true", help="do not start the dashboard/API")
    p.add_argument("--no-worker", action="store_true", help="do not start a Celery worker")
    p.set_defaults(func=run)


def _configure_logging(settings: Any) -> None:
    level = getattr(logging, str(settings.log_level).upper(), logging.INFO)
    if settings.log_json:
        fmt = '{"t":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}'
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def send_demo_study(settings: Any, port: int) -> None:
    """Hook for ``make run``: send a phantom stroke study to our own SCP (implemented in cli.demo)."""
    from cli.demo import send_demo_study as _send_demo

    try:
        _send_demo(settings, port)
    except Exception as exc:  # noqa: BLE001 - the demo must never take the service down
        log.warning("--demo failed: %s; send a study yourself: synthperf send DIR 127.0.0.1 %d", exc, port)


def _start_api(settings: Any) -> tuple[Any, threading.Thread] | None:
    if not _module_exists("service.api.app"):
        log.info("service.api.app not present: no dashboard")
        return None
    import uvicorn

    from service.api.app import create_app

    config = uvicorn.Config(
        create_app(settings), host=settings.api_host, port=settings.api_port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # we own the signals
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    log.info("dashboard on http://%s:%d", settings.api_host, settings.api_port)
    return server, thread


def _replica_suffix(settings: Any) -> str:
    """``""`` for the only gateway, ``-<replica_id>`` for a named replica (issue 19): replicas that share
    one data dir (a ReadWriteMany volume) each hold their own pid files, and two ``serve`` under one
    name on one data dir still refuse each other."""
    return f"-{settings.replica_id}" if settings.replica_id else ""


def _worker_pid_file(settings: Any) -> Path:
    return settings.data_dir / f"worker{_replica_suffix(settings)}.pid"


def _kill_leftover_worker(settings: Any) -> None:
    """Kill the process group of a worker a previous ``serve`` started and did not stop.

    The kernel's parent-death signal normally takes it down with ``serve``; this covers platforms
    without one. Only a live process whose command line is our Celery worker is touched.
    """
    path = _worker_pid_file(settings)
    try:
        pid = int(path.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, ValueError, IndexError):
        return
    if b"worker.celery_app" not in cmdline:
        return
    log.warning("killing worker %d left over by an earlier serve", pid)
    try:
        os.killpg(pid, signal.SIGKILL)  # its own process group: the main process and its pool
    except OSError:
        pass


def _start_worker(settings: Any, env_overrides: dict[str, str]) -> subprocess.Popen[bytes] | None:
    """The Celery worker as a child in its own process group (Ctrl-C reaches only us; we stop it in
    order), told to die with us (``SYNTHPERF_PARENT_PID``: PR_SET_PDEATHSIG in worker.celery_app)."""
    if not (Path(__file__).resolve().parents[1] / "worker" / "celery_app.py").is_file():
        log.info("worker/celery_app.py not present: no worker")
        return None
    env = dict(os.environ, **env_overrides, SYNTHPERF_PARENT_PID=str(os.getpid()))
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker", "-Q", "cpu,gpu",
           "--concurrency", "1", "--loglevel", "INFO"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    _worker_pid_file(settings).write_text(f"{proc.pid}\n")
    log.info("worker started (pid %d)", proc.pid)
    return proc


def run(args: argparse.Namespace) -> int:
    from common.config import SettingsError, load_settings
    from common.jobstore.replicas import ReplicaConflictError
    from common.procs import InstanceLockError, PidFileLock
    from service.gateway import Gateway

    overrides = {"data_dir": args.data_dir, "scp_port": args.port, "ae_title": args.aet, "api_port": args.api_port}
    try:
        settings = load_settings(args.config, **overrides)
    except SettingsError as exc:
        print(f"synthperf serve: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    instance_lock = PidFileLock(settings.data_dir / f"serve{_replica_suffix(settings)}.pid")
    try:
        instance_lock.acquire()
    except InstanceLockError as exc:
        who = f" as replica {settings.replica_id!r}" if settings.replica_id else ""
        print(f"synthperf serve: another serve runs on data dir {settings.data_dir}{who}: {exc}", file=sys.stderr)
        return 2
    if not args.no_worker:
        _kill_leftover_worker(settings)
    # Children read settings from the environment: pass the same file and overrides on.
    child_env = {"SYNTHPERF_DATA_DIR": str(settings.data_dir.resolve())}
    if args.config:
        child_env["SYNTHPERF_CONFIG"] = str(Path(args.config).resolve())
    for key, value in (("AE_TITLE", args.aet), ("SCP_PORT", args.port), ("API_PORT", args.api_port)):
        if value is not None:
            child_env[f"SYNTHPERF_{key}"] = str(value)

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    try:
        gateway = Gateway(settings)
        port = gateway.start()
    except ReplicaConflictError as exc:
        print(f"synthperf serve: {exc}", file=sys.stderr)
        instance_lock.release()
        return 2
    except OSError as exc:
        print(f"synthperf serve: cannot listen on DICOM port {settings.scp_port}: {exc}; "
              "choose another with --port", file=sys.stderr)
        instance_lock.release()
        return 2
    print(f"synthperf: SCP {settings.ae_title} listening on {settings.scp_host}:{port}", flush=True)
    demo_pacs = None
    if args.demo:  # Orthanc with OHIF as the demo PACS, where installed and nothing is configured
        from cli.demo_pacs import start_demo_pacs

        demo_pacs, settings = start_demo_pacs(settings, child_env)
    api = None if args.no_api else _start_api(settings)
    worker = None if args.no_worker else _start_worker(settings, child_env)
    if args.demo:
        from cli.demo import ensure_demo_admin

        try:
            ensure_demo_admin(settings)
        except Exception as exc:  # noqa: BLE001 - the demo must never take the service down
            log.warning("demo admin account not created: %s", exc)
        threading.Thread(target=send_demo_study, args=(settings, port), name="demo", daemon=True).start()

    try:
        while not stop.wait(1.0):
            if worker is not None and worker.poll() is not None:
                log.error("worker exited with code %s; restarting it", worker.returncode)
                worker = _start_worker(settings, child_env)
    finally:
        gateway.scp.stop()
        if worker is not None and worker.poll() is None:
            worker.terminate()  # Celery warm shutdown: finishes the current task (acks late)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        if api is not None:
            api[0].should_exit = True
            api[1].join(timeout=10)
        gateway.stop()
        if demo_pacs is not None:  # after the worker: its last deliveries have gone out
            demo_pacs.stop()
        _worker_pid_file(settings).unlink(missing_ok=True)
        instance_lock.release()
        log.info("stopped")
    return 0
