"""End-to-end latency: last instance sent -> last result object accepted by a PACS (Orthanc).

A 25-slice 128x128 study (phantom when its DICOM writer is present, else the in-memory builder of
the encode tests) goes storescu -> our SCP -> completion -> Celery worker on Redis -> pipeline ->
C-STORE into a real Orthanc on loopback. Prints the total and the breakdown: completion wait,
each stage, queue hand-offs and delivery. Needs Redis (make bench starts one) and Orthanc.

Reference: the same study's C-STORE into Orthanc by storescu directly (the floor of moving these
bytes through a PACS), timed in the same run.

Sampling is the model's default (steps x samples from its config) on the inference path that
``auto`` picks on this machine; that measurement is made once before the timed study (as a
deployed worker has it cached from its first study). ``--isa avx2`` runs everything as on a CPU
with AVX2 only (torch's dispatch and oneDNN limited with ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA;
ONNX Runtime and OpenVINO pick their own kernels and are not limited). The CPU capability is printed.

    python -m bench.e2e [--steps N] [--samples N] [--stable-age 2] [--isa avx2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path

SHAPE = (25, 128, 128)


def make_study(folder: Path) -> tuple[Path, str]:
    try:
        from phantom.api import make_case, write_dicom_study

        case = make_case(11, matrix=128)  # seed 11: 25 slices
        return Path(write_dicom_study(case, folder, "siemens", enhanced=False)), f"phantom {case.grid.shape}"
    except (ImportError, ModuleNotFoundError):
        from tests.unit.test_encode_sources import write_classifiable_study

        write_classifiable_study(folder, SHAPE, (1.8, 1.8, 5.0))
        return folder, f"builder {SHAPE}"


def model_ref(tmp: Path) -> tuple[str, str]:
    from tests.integration.test_process import DEMO_WEIGHTS, export_untrained_model

    if DEMO_WEIGHTS.is_file():
        return "demo", "demo weights"
    return export_untrained_model(tmp / "model"), "UNTRAINED weights (demo not exported yet; timing only)"


ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def premeasure_runtime(model: str, cache_dir: Path) -> dict:
    """Let ``auto`` measure the inference paths once, on the bench's own phantom study, into the cache
    the worker reads (a deployed worker has this from its first study on the machine)."""
    from models.tmax_ddpm.inference import TmaxSynthesizer
    from phantom.api import make_case

    case = make_case(11, matrix=128)
    synth = TmaxSynthesizer.load(model, device="cpu", runtime_dir=cache_dir)
    synth.synthesize(case.dwi, case.flair_on_dwi, case.core, case.brain, steps=1, samples=1)
    return synth.runtime.summary()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the model's)")
    ap.add_argument("--samples", type=int, default=None, help="samples (default: the model's)")
    ap.add_argument("--stable-age", type=float, default=None, help="completion quiet time (s; default: the setting's)")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    ap.add_argument("--isa", choices=sorted(ISA_ENV), default=None, help="run as on a CPU with only this ISA")
    ap.add_argument("--redis", default=os.environ.get("SYNTHPERF_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    args = ap.parse_args(argv)
    if args.isa and any(os.environ.get(k) != v for k, v in ISA_ENV[args.isa].items()):
        # torch reads these at import: start again with them set (children inherit them)
        env = {**os.environ, **ISA_ENV[args.isa]}
        os.execve(sys.executable, [sys.executable, "-m", "bench.e2e", *(argv if argv is not None else sys.argv[1:])], env)
    import torch

    from models.tmax_ddpm.runtime import CpuFeatures

    feats = CpuFeatures.detect()

    from sqlalchemy import func, select

    from common.jobstore.db import session_scope
    from common.jobstore.models import Delivery, Job, JobState, Stage
    from tests.integration.harness import OrthancServer, PrivateRedis, storescu
    from tests.integration.test_e2e import Service, wait_job

    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    try:
        study, what = make_study(tmp / "study")
        model, model_note = model_ref(tmp)
        n_files = sum(1 for p in study.rglob("*") if p.is_file() and not p.name.endswith((".json", ".gz")))
        orthanc = OrthancServer(tmp / "orthanc")
        orthanc.start()
        # reference: storescu straight into Orthanc
        t = time.perf_counter()
        exe = shutil.which("storescu")
        files = [str(p) for p in sorted(study.rglob("*")) if p.is_file() and not p.name.endswith((".json", ".gz"))]
        subprocess.run([exe, "-aec", orthanc.aet, "127.0.0.1", str(orthanc.dicom_port), *files], check=True,
                       capture_output=True)
        ref_s = time.perf_counter() - t
        for oid in orthanc.instances():  # leave the PACS empty for our results
            import httpx

            httpx.delete(f"{orthanc.url}/instances/{oid}", timeout=10)
        runtime_dir = Path("runs") / "runtime"
        t_rt = time.perf_counter()
        choice = premeasure_runtime(model, runtime_dir)
        print(f"inference path (auto, measured or cached before the timed study in {time.perf_counter() - t_rt:.0f} s): "
              f"{choice}", flush=True)
        broker = PrivateRedis(tmp / "redis", args.redis)
        from common.config import Settings

        stable_age = args.stable_age if args.stable_age is not None else Settings.model_fields["stable_age_s"].default
        service = Service(tmp / "svc", broker.start(), orthanc, model, ddim_steps=args.steps, samples=args.samples,
                          stable_age_s=stable_age, inference_cache_dir=str(runtime_dir.resolve()))
        service.start()
        try:
            # steady state: the worker child has loaded the model (worker_process_init) before we send
            deadline = time.monotonic() + 180
            while "model loaded" not in (service.folder / "worker.log").read_text() and time.monotonic() < deadline:
                time.sleep(0.5)
            storescu(study, service.scp_port)
            from datetime import datetime

            t_sent = datetime.now(UTC)
            settings = service.settings
            job_id = wait_job(settings, lambda j: j.state in JobState.FINAL, 900, service)
            with session_scope(settings.effective_database_url) as s:
                job = s.get(Job, job_id)
                assert job.state == JobState.DONE, (job.state, job.error)
                last = s.scalar(select(func.max(Delivery.delivered_at)).where(Delivery.job_id == job_id))
                n_obj = s.scalar(select(func.count()).select_from(Delivery).where(Delivery.job_id == job_id))
                created = job.created_at
                stages = s.scalars(select(Stage).where(Stage.job_id == job_id).order_by(Stage.id)).all()
                rows = [(st.name, st.started_at, st.finished_at, st.duration_s) for st in stages]
        finally:
            service.stop()
            orthanc.stop()
            broker.stop()

        def aware(d):
            return d if d.tzinfo else d.replace(tzinfo=UTC)

        total = (aware(last) - t_sent).total_seconds()
        completion = (aware(created) - t_sent).total_seconds()
        print(f"e2e: {what}, {n_files} instances in; {n_obj} result objects out; model: {model_note}")
        print(f"  CPU {feats.name}, torch capability {feats.capability} (native bf16 {feats.native_bf16}), "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} cores; inference path {choice['path']}")
        print(f"  steps={args.steps or 'model default'} samples={args.samples or 'model default'} "
              f"stable_age={stable_age}s")
        print(f"  last instance sent -> last object accepted by Orthanc: {total:6.1f} s   (target < 30 s)")
        print(f"  completion (job created after last instance):          {completion:6.1f} s")
        prev_end = aware(created)
        stage_sum = 0.0
        for name, start, end, dur in rows:
            gap = (aware(start) - prev_end).total_seconds()
            print(f"    queue/hand-off {gap:5.2f} s | {name:<10} {dur:6.2f} s")
            prev_end = aware(end)
            stage_sum += dur
        print(f"  stages total {stage_sum:.1f} s; reference storescu -> Orthanc of the input study: {ref_s:.2f} s")
        res = {"total_s": total, "completion_s": completion, "stages": {r[0]: r[3] for r in rows},
               "reference_s": ref_s, "objects": n_obj, "capability": feats.capability, "inference": choice,
               "cpu": feats.name, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "stable_age_s": stable_age,
               "steps": args.steps, "samples": args.samples, "instances": n_files, "study": what, "model": model_note,
               "isa": args.isa}
        if not args.no_doc:
            write_doc(res)
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def write_doc(r: dict) -> None:
    """The latest end-to-end figures, one block per CPU capability (docs/benchmarks.md)."""
    import re

    kind = r["capability"]
    begin, end = f"<!-- bench.e2e.{kind}:begin -->", f"<!-- bench.e2e.{kind}:end -->"
    how = (f"as on an AVX2-only CPU (`--isa {r['isa']}`: ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA; ONNX Runtime "
           "and OpenVINO still use their own kernels)") if r["isa"] else "natively"
    stages = " · ".join(f"{k} {v:.1f} s" for k, v in r["stages"].items())
    block = "\n".join([
        begin,
        f"`python -m bench.e2e{' --isa ' + r['isa'] if r['isa'] else ''}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{how}: CPU `{r['cpu']}`, torch capability **{kind}**, {r['cores']} cores, {r['threads']} threads; "
        f"inference path **{r['inference']['path']}** ({r['inference']['how']}); sampling "
        f"{r['steps'] or 'model default'} steps x {r['samples'] or 'model default'} samples; stable_age {r['stable_age_s']} s; "
        f"{r['study']}, {r['instances']} instances in, {r['objects']} objects out.",
        "",
        f"- last instance sent -> last object accepted by Orthanc: **{r['total_s']:.1f} s** (target < 30 s)",
        f"- completion (last instance -> job): {r['completion_s']:.1f} s; stages: {stages}",
        f"- reference: storescu of the input study straight into Orthanc {r['reference_s']:.1f} s",
        end,
    ])
    text = DOC.read_text()
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
