"""Receive throughput and completion latency, side by side in one run.

Throughput: DCMTK storescu sends the same 500 synthetic MR instances (128x128, 16 bit) over one
association to (a) our SCP (``synthperf serve``, fsync on: the default), (b) our SCP with
spool_fsync off, (c) DCMTK storescp, (d) Orthanc, and (e) DCMTK storescp --ignore, which
receives and answers but stores nothing: the fastest any receiver can be with this client on this
machine, against which the storescp target is put in perspective (see ``floor``). Each server is
started fresh, on a free loopback port with an empty store, for every round; the order rotates between rounds; every
process gets TCP_NODELAY=1 (DCMTK and Orthanc are slow without it). Instances/s is the median
over rounds of 500 / wall time of the storescu run.

The floor: the spool's own durable write (``Spool.store`` of one 33 KiB instance, fsync on and
off, in the bench's directory, i.e. on the same disk) timed in the same run, beside the round
trips of storescp and of storescp --ignore, says how much of the storescp target any durable
receiver could reach.

Completion latency (in-process gateway): the time from the last stored instance to the job
being enqueued, and how many jobs the study made, for a series that declares its size
(ImagesInAcquisition), one that does not, one that declares more images than it sends, and an
enhanced multi-frame phantom study sent in two associations. Completion is per study: each waits
for stable_age of quiet, the short one for incomplete_series_wait_s (the reference each is put
against).

    python -m bench.receive [--rounds 3] [--instances 500] [--stable-age 2] [--incomplete-wait 4]
    python -m bench.receive --latency-only --stable-age 10 --incomplete-wait 30   # the defaults
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from service.ingest.spool import Spool
from tests.conftest import free_port
from tests.integration.harness import OrthancServer

REPO = Path(__file__).resolve().parents[1]
NODELAY = {"TCP_NODELAY": "1"}
IGNORE = "DCMTK storescp --ignore (stores nothing)"


def make_series(folder: Path, n: int, declare: bool, seed: int = 0, size: int = 128) -> list[Path]:
    """``n`` small synthetic MR slices of one new study/series (random pixels, seeded)."""
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID, ds.PatientName = "MR", "BENCH", "BENCH^RECEIVE"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        if declare:
            ds.ImagesInAcquisition = n
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def start_ours(work: Path, port: int, fsync: bool) -> tuple[subprocess.Popen, str]:
    work.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **NODELAY, SYNTHPERF_DISK_WATERMARK_MB="0", SYNTHPERF_SPOOL_FSYNC=str(fsync).lower(),
               SYNTHPERF_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve", "--data-dir", str(work), "--port", str(port),
         "--no-api", "--no-worker"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(work.parent / f"{work.name}.log", "wb"),
    )
    return proc, "SYNTHPERF"


def start_storescp(work: Path, port: int, store: bool = True) -> tuple[subprocess.Popen, str]:
    """DCMTK storescp writing into ``work``, or with ``store=False`` receiving and discarding (--ignore)."""
    work.mkdir(parents=True)
    args = ["-od", str(work)] if store else ["--ignore"]
    proc = subprocess.Popen(["storescp", *args, str(port)], env=dict(os.environ, **NODELAY),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, "ANY-SCP"


def start_orthanc(work: Path, port: int) -> tuple[subprocess.Popen, str]:
    """The tests' Orthanc (loopback only, TCP_NODELAY=1), without --verbose, on ``port``."""
    server = OrthancServer(work, verbose=False, dicom_port=port)
    server.start()
    assert server.proc is not None
    return server.proc, server.aet


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def time_storescu(port: int, aec: str, files: list[Path]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(["storescu", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                         env=NODELAY, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"storescu to {aec} failed: {res.stderr[-500:]}")
    return dt


def time_parallel(port: int, aec: str, files: list[Path], k: int) -> float:
    """k storescu processes at once, each sending its share over its own association."""
    shares = [files[i::k] for i in range(k)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aec", aec, "127.0.0.1", str(port), *map(str, share)], env=NODELAY,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for share in shares]
    errors = [p.communicate()[1] for p in procs]
    dt = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"parallel storescu to {aec} failed: {errors}")
    return dt


def throughput(files: list[Path], rounds: int, root: Path, parallel: int = 1) -> dict[str, list[float]]:
    targets: dict[str, Callable[[Path, int], tuple[subprocess.Popen, str]]] = {
        "synthperf (fsync on, default)": lambda w, p: start_ours(w, p, True),
        "synthperf (spool_fsync off)": lambda w, p: start_ours(w, p, False),
        "DCMTK storescp": start_storescp,
        "Orthanc": start_orthanc,
        IGNORE: lambda w, p: start_storescp(w, p, store=False),
    }
    names = list(targets)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            work = root / f"r{r}-{names.index(name)}"
            port = free_port()
            proc, aec = targets[name](work, port)
            try:
                wait_port(port, proc)
                os.sync()  # start each run with the journal committed (earlier runs' writes and deletions)
                time.sleep(0.3)
                dt = time_storescu(port, aec, files) if parallel == 1 else time_parallel(port, aec, files, parallel)
            finally:
                stop(proc)
            rates[name].append(len(files) / dt)
            print(f"  round {r + 1} {name:<30} {len(files) / dt:8.1f} instances/s ({dt:.2f} s)"
                  f"{'' if parallel == 1 else f' [{parallel} associations]'}", flush=True)
            # Received files stay until the whole run ends: deleting 500 files here would make the next
            # server's journal commits carry the discards (the disk is mounted with discard), and the
            # fsyncing receiver would pay for its predecessor's clean-up.
    return rates


def spool_write_ms(root: Path, blob: bytes, fsync: bool, n: int = 300) -> float:
    """Median ms for one ``Spool.store`` of ``blob`` (new file, as in a C-STORE), fsync on or off."""
    spool = Spool(root / f"spool-{'fsync' if fsync else 'nosync'}", fsync=fsync)
    spool.store("1.2/1.3/1.4.0.dcm", (blob,))  # the directories exist from then on, as in a series
    times = []
    for i in range(1, n + 1):
        t0 = time.perf_counter()
        spool.store(f"1.2/1.3/1.4.{i}.dcm", (blob,))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def floor(rates: dict[str, list[float]], write_on: float, write_off: float) -> None:
    """Print how the storescp target compares with a receiver that stores nothing."""
    scp, ignore = statistics.median(rates["DCMTK storescp"]), statistics.median(rates[IGNORE])
    rt_scp, rt_ignore, rt_target = 1000 / scp, 1000 / ignore, 1000 / (1.2 * scp)
    print(f"\nfloor: storescp round trip {rt_scp:.3f} ms; 1.2x storescp needs {rt_target:.3f} ms per instance;"
          f" storescp --ignore (stores nothing) takes {rt_ignore:.3f} ms, so a storing receiver has"
          f" {rt_target - rt_ignore:+.3f} ms for everything it does.")
    print(f"       the spool's durable write alone (file + directory fsync, new 33 KiB file) takes {write_on:.3f} ms"
          f" ({write_off:.3f} ms without fsync); best any durable receiver could reach with it:"
          f" {rt_scp / (rt_ignore + write_on):.2f}x storescp.")


def phantom_in_pieces(folder: Path) -> list[list[Path]]:
    """The enhanced multi-frame phantom study of issue 16 as a scanner sends it in two
    associations: the diffusion series (one multi-frame object each, complete on arrival), then
    the rest."""
    from phantom import api

    study = Path(api.write_dicom_study(api.make_case(11, matrix=64), folder, "siemens", enhanced=True))
    files = sorted(study.rglob("*.dcm"))
    dwi = [f for f in files if "diff" in f.parent.name]
    return [dwi, [f for f in files if f not in dwi]]


def latency_cases(root: Path, n: int) -> list[tuple[str, str, list[list[Path]]]]:
    """(label, the quiet time it waits for, its associations' files)."""
    declared = make_series(root / "lat-declared", n, declare=True, seed=1)
    undeclared = make_series(root / "lat-undeclared", n, declare=False, seed=1)
    short = make_series(root / "lat-over-declared", n, declare=True, seed=1)[: n - 10]
    return [
        (f"{n}-image series, declares its size", "stable_age", [declared]),
        (f"{n}-image series, declares nothing", "stable_age", [undeclared]),
        (f"{n}-image series, declares 10 more than it sends", "incomplete_series_wait_s", [short]),
        ("enhanced multi-frame phantom study, 2 associations 1 s apart", "stable_age", phantom_in_pieces(root / "ph")),
    ]


def completion_latency(root: Path, n: int, stable_age: float, incomplete_wait: float) -> list[tuple[str, str, float, int]]:
    """(label, reference, seconds from the last stored instance to the job, jobs made) per case."""
    from common.config import load_settings
    from service.gateway import Gateway

    settings = load_settings(data_dir=root / "latency", disk_watermark_mb=0, stable_age_s=stable_age,
                             incomplete_series_wait_s=incomplete_wait, completion_poll_s=0.2)
    enqueued: list[tuple[int, float]] = []
    gw = Gateway(settings, lambda job_id: enqueued.append((job_id, time.time())), host="127.0.0.1", port=0)
    port = gw.start()
    out = []
    try:
        for label, ref, associations in latency_cases(root, n):
            before = len(enqueued)
            for i, files in enumerate(associations):
                if i:
                    time.sleep(1.0)
                time_storescu(port, "SYNTHPERF", files)
            last = gw.receiver.stats.last_stored_at
            end = time.monotonic() + max(stable_age, incomplete_wait) + 30
            while len(enqueued) == before and time.monotonic() < end:
                time.sleep(0.005)
            if len(enqueued) == before or last is None:
                raise RuntimeError(f"no job for: {label}")
            first_job_at = enqueued[before][1]
            time.sleep(stable_age + 1)  # a second job for the same study would have fired by now
            out.append((label, ref, first_job_at - last, len(enqueued) - before))
    finally:
        gw.stop()
    return out


def print_latency(root: Path, stable_age: float, incomplete_wait: float) -> None:
    refs = {"stable_age": stable_age, "incomplete_series_wait_s": incomplete_wait}
    print(f"\ncompletion latency after the last instance (stable_age {stable_age} s, "
          f"incomplete_series_wait_s {incomplete_wait} s):")
    for label, ref, seconds, jobs in completion_latency(root, 100, stable_age, incomplete_wait):
        print(f"  {label}: {seconds:.3f} s = {ref} + {seconds - refs[ref]:.3f} s (target {ref} + < 0.5 s), "
              f"{jobs} job(s) (target 1)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--stable-age", type=float, default=2.0)
    ap.add_argument("--incomplete-wait", type=float, default=4.0, help="incomplete_series_wait_s")
    ap.add_argument("--latency-only", action="store_true", help="only the completion latency")
    ap.add_argument("--parallel", type=int, default=4, help="also time this many associations at once (1: skip)")
    args = ap.parse_args()
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (make bench installs DCMTK and Orthanc)", file=sys.stderr)
            return 1
    root = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    try:
        if args.latency_only:
            print_latency(root, args.stable_age, args.incomplete_wait)
            return 0
        files = make_series(root / "src", args.instances, declare=True)
        print(f"throughput: {args.instances} MR instances of {files[0].stat().st_size / 1024:.0f} KiB, "
              f"{args.rounds} rounds, one storescu association per run", flush=True)
        rates = throughput(files, args.rounds, root)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print("\n| receiver | instances/s (median) | runs |\n|---|---|---|")
        for k, v in med.items():
            print(f"| {k} | {v:.0f} | {', '.join(f'{x:.0f}' for x in rates[k])} |")
        # Ratios paired within each round (the load on a shared machine drifts between rounds),
        # then the median over rounds.
        def ratio(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))

        on, off = "synthperf (fsync on, default)", "synthperf (spool_fsync off)"
        for ref, target in (("DCMTK storescp", 1.2), ("Orthanc", 1.0)):
            print(f"ratio ours/{ref}: {ratio(on, ref):.2f}x (target >= {target}x); "
                  f"with spool_fsync off {ratio(off, ref):.2f}x  [median of per-round ratios]")
        blob = files[0].read_bytes()
        floor(rates, spool_write_ms(root, blob, True), spool_write_ms(root, blob, False))
        if args.parallel > 1:
            print(f"\nextra: {args.parallel} associations at once (storescu processes), one round", flush=True)
            prates = throughput(files, 1, root / "parallel", parallel=args.parallel)
            for k, v in prates.items():
                print(f"| {k}, {args.parallel} associations | {v[0]:.0f} |")
        print_latency(root, args.stable_age, args.incomplete_wait)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
