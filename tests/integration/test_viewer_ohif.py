"""What a radiologist sees: our results opened in OHIF 3.13.2, the viewer many sites use (issue 18).

One Orthanc with Debian's DICOMweb plugin, one origin that serves OHIF's built app and proxies
``/dicom-web`` to it (cli/viewer.py), one headless Chromium (Debian's, WebGL on SwiftShader)
driven by Playwright, one phantom study run through ``synthperf process``. The phantom goes in
through Orthanc's REST API, our results through STOW-RS on the viewer's origin.

What is checked, through ``window.services`` and ``window.cornerstone`` (OHIF exposes both):

- the SEG, hydrated on the DWI as a user does (load, "Yes"): the overlay's colour is on screen at
  lesion points and absent at healthy ones, in patient coordinates, on the slices where the
  lesion starts and ends (so a SEG one slice off fails);
- the float and the integer Tmax Parametric Maps: the volume OHIF builds holds our values at the
  same patient positions (so reversed frames fail), after its documented x100 (OHIF-3 in
  docs/conformance.md); the integer map's values within its step (0.1 s) of our float Tmax;
- each of those checks fed a deliberately broken copy of our object (edited with pydicom): the
  SEG shifted one slice either way, the map's frames reversed, the integer map in 0.01 s units
  and two steps off; each must be caught;
- the overlay Secondary Capture shows its colour;
- the TID 1500 SR: OHIF 3.13.2 fails on it with the TypeError documented as OHIF-1 (and so does
  the minimal reproduction there); when a new OHIF shows it, this test says to update the docs.

Screenshots of each object go to docs/screenshots/ohif_*.png with SYNTHPERF_SCREENSHOTS=1, to the
test's temp folder otherwise.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from cli.viewer import ViewerFront, ohif_dist
from tests.conftest import REPO_ROOT, _missing, small_scale
from tests.integration.harness import OrthancServer
from tests.integration.test_process import model_ref, write_phantom  # noqa: F401 - fixture re-export

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
# WebGL2 on SwiftShader in a headless browser: OHIF renders with cornerstone3D's GPU path
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--ignore-gpu-blocklist", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
SHOTS = REPO_ROOT / "docs" / "screenshots"
VIEWPORT_ID = "default"
OHIF_X = 100.0  # OHIF's Parametric Map loader multiplies stored values by 100 (OHIF-3)
INT_STEP_S = 0.1  # the integer Tmax map's unit (docs/conformance.md section 9)
PRESENT_CHROMA = 25  # an overlay pixel: channels differ by at least this (the DWI is grey: R = G = B)
ABSENT_CHROMA = 8
BROKEN_SERIES = 990  # broken copies sort after every real series in the study browser

# ----------------------------------------------------------------------------------- JS snippets

JS_LOAD = """async (uid) => {
  const s = window.services;
  const vps = s.hangingProtocolService.getViewportsRequireUpdate('default', uid, false);
  window.commandsManager.run('setDisplaySetsForViewports', {viewportsToUpdate: vps});
}"""
JS_DISPLAY_SETS = """() => window.services.displaySetService.getActiveDisplaySets().map(d => ({
  uid: d.displaySetInstanceUID, series: d.SeriesInstanceUID, modality: d.Modality,
  description: d.SeriesDescription || '', frames: d.numImageFrames || 0}))"""
JS_GRID = """() => { const st = window.services.viewportGridService.getState();
  const vp = st.viewports.get('default'); return vp ? vp.displaySetInstanceUIDs : []; }"""
JS_CLEAR_SEGS = """() => { const s = window.services.segmentationService;
  for (const x of s.getSegmentations()) s.remove(x.segmentationId); }"""
JS_SEG_IDS = "() => window.services.segmentationService.getSegmentations().map(x => x.segmentationId)"
JS_STACK_SLICES = """() => { const cs = window.cornerstone;
  const vp = cs.getRenderingEngines()[0].getViewport('default');
  return vp.getImageIds().map(id => { const p = cs.metaData.get('imagePlaneModule', id);
    return {pos: p.imagePositionPatient, row: p.rowCosines, col: p.columnCosines}; }); }"""
JS_SHOW_SLICE = """async ({index, points}) => { const cs = window.cornerstone;
  const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  let vp = null;  // a viewport being replaced (e.g. after "Yes") has a detached, zero-width canvas
  for (let i = 0; i < 100; i++) {
    vp = cs.getRenderingEngines()[0].getViewport('default');
    if (vp && vp.canvas.getBoundingClientRect().width > 0) break;
    await frame();
  }
  await vp.setImageIdIndex(index);  // renders the slice and its labelmap
  await frame();
  // what the viewport's canvas shows (the rendered image and overlays) around each point
  const ctx = vp.canvas.getContext('2d');
  const scale = vp.canvas.width / vp.canvas.getBoundingClientRect().width;
  return {index: vp.getCurrentImageIdIndex(), rgb: points.map(p => { const c = vp.worldToCanvas(p);
    const d = ctx.getImageData(Math.round(c[0] * scale) - 2, Math.round(c[1] * scale) - 2, 5, 5).data;
    const px = []; for (let i = 0; i < d.length; i += 4) px.push([d[i], d[i + 1], d[i + 2]]); return px; })}; }"""
JS_CANVAS_GRID = """() => { const vp = window.cornerstone.getRenderingEngines()[0].getViewport('default');
  const c = vp.canvas; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; const out = [];
  for (let y = 0; y < c.height; y += 8) for (let x = 0; x < c.width; x += 8) {
    const i = 4 * (y * c.width + x); out.push([d[i], d[i + 1], d[i + 2]]); }
  return out; }"""
JS_VOLUME = """(uid) => { const v = window.cornerstone.cache.getVolume(uid);
  if (!v || !v.loadStatus || !v.loadStatus.loaded) return null;
  const sd = v.voxelManager.getCompleteScalarDataArray();
  return {dims: v.dimensions, origin: v.origin, spacing: v.spacing, direction: Array.from(v.direction),
          type: sd.constructor.name, values: Array.from(sd)}; }"""


# ----------------------------------------------------------------------------------- our objects


@dataclass
class Results:
    study_dir: Path
    objects: dict[str, Path]  # kind -> file (overlay: the first slice's)
    overlays: list[Path]
    study_uid: str


@pytest.fixture(scope="module")
def ohif_app() -> Path:
    """OHIF's built app (fetched by deploy/dev/ensure_ohif.sh) and the browser, before any work."""
    pytest.importorskip("playwright.sync_api")
    dist = ohif_dist()
    if dist is None:
        _missing("OHIF's app is not installed (make test runs deploy/dev/ensure_ohif.sh)")
    if not Path(CHROMIUM).is_file():
        _missing("chromium is not installed (make test installs it from Debian packages)")
    return dist


@pytest.fixture(scope="module")
def results(tmp_path_factory, model_ref, ohif_app) -> Results:  # noqa: F811 - fixture from test_process
    """A phantom study and what ``synthperf process`` makes of it (fp32 path: no path timing)."""
    from cli.main import main as cli_main

    root = tmp_path_factory.mktemp("ohif")
    _case, study_dir = write_phantom(root / "phantom", seed=7, vendor="siemens", matrix=64)
    out = root / "out"
    rc = cli_main(["process", str(study_dir), "--out", str(out), "--steps", "1", "--samples", "1", "--seed", "3",
                   "--model", model_ref, "--inference-path", "fp32"])
    assert rc == 0
    dcm = out / "dicom"
    objects = {p.stem: p for p in dcm.glob("*.dcm") if not p.stem.startswith("overlay_")}
    overlays = sorted(dcm.glob("overlay_*.dcm"))
    assert {"tmax", "tmax_int", "seg", "sr"} <= objects.keys() and overlays
    uid = pydicom.dcmread(objects["seg"], stop_before_pixels=True).StudyInstanceUID
    return Results(study_dir, objects, overlays, uid)


def _renew(ds: pydicom.Dataset, series_number: int, what: str) -> pydicom.Dataset:
    """A broken copy is an object of its own: new instance and series, named for what is wrong."""
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"BROKEN test copy: {what}"
    return ds


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    iop = np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    return np.cross(iop[:3], iop[3:])


def _frame_positions(ds: pydicom.Dataset) -> np.ndarray:
    return np.asarray([f.PlanePositionSequence[0].ImagePositionPatient for f in ds.PerFrameFunctionalGroupsSequence],
                      float)


def shifted_seg(path: Path, dz: int, series_number: int) -> pydicom.Dataset:
    """Our SEG with every segment's mask moved ``dz`` slices along the slice normal (positions and
    references untouched, as an off-by-one in our encoder would leave them)."""
    from pydicom.pixels import pack_bits

    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    seg_of = [int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for f in ds.PerFrameFunctionalGroupsSequence]
    height = _frame_positions(ds) @ _normal(ds)
    order = {h: i for i, h in enumerate(sorted(set(np.round(height, 3))))}
    slot = {(s, order[round(h, 3)]): i for i, (s, h) in enumerate(zip(seg_of, height, strict=True))}
    moved = np.zeros_like(frames)
    for (s, k), i in slot.items():
        src = slot.get((s, k - dz))
        if src is not None:
            moved[i] = frames[src]
    ds.PixelData = pack_bits(moved.ravel())
    return _renew(ds, series_number, f"SEG shifted {dz:+d} slice")


def reversed_map(path: Path, series_number: int) -> pydicom.Dataset:
    """Our float Tmax map written head first: frames and their functional groups reversed together
    (still a valid object: every frame keeps its position)."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)[::-1]
    ds.FloatPixelData = np.ascontiguousarray(frames, dtype="<f4").tobytes()
    ds.PerFrameFunctionalGroupsSequence = list(ds.PerFrameFunctionalGroupsSequence)[::-1]
    return _renew(ds, series_number, "Tmax map frames reversed")


def rescaled_int_map(path: Path, series_number: int, how: str) -> pydicom.Dataset:
    """Our integer Tmax map with stored values other than the documented 0.1 s units:
    ``units_0.01s`` (the former scale, slope 0.01: valid DICOM, overflows in OHIF) or
    ``two_steps_off`` (every value 0.2 s high)."""
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.int64)
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    if how == "units_0.01s":
        stored = stored * 10
        mapping.RealWorldValueSlope = 0.01
        mapping.RealWorldValueLastValueMapped = int(stored.max())
    elif how == "two_steps_off":
        stored = stored + 2
        mapping.RealWorldValueLastValueMapped = int(stored.max())
    else:
        raise ValueError(f"how: unknown {how!r}")
    ds.PixelData = np.ascontiguousarray(np.clip(stored, 0, 65535), dtype="<u2").tobytes()
    return _renew(ds, series_number, f"integer Tmax map {how}")


@pytest.fixture(scope="module")
def broken(results, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("broken")
    made = {
        "seg_up": shifted_seg(results.objects["seg"], +1, BROKEN_SERIES),
        "seg_down": shifted_seg(results.objects["seg"], -1, BROKEN_SERIES + 1),
        "pm_reversed": reversed_map(results.objects["tmax"], BROKEN_SERIES + 2),
        "int_units_0.01s": rescaled_int_map(results.objects["tmax_int"], BROKEN_SERIES + 3, "units_0.01s"),
        "int_two_steps_off": rescaled_int_map(results.objects["tmax_int"], BROKEN_SERIES + 4, "two_steps_off"),
    }
    paths = {}
    for name, ds in made.items():
        paths[name] = folder / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    return paths


# ----------------------------------------------------------------------------------- the viewer


class Viewer:
    """One OHIF page on our study, and the steps a user takes in it."""

    def __init__(self, page, front: ViewerFront, study_uid: str, shots: Path) -> None:
        self.page = page
        self.front = front
        self.study_uid = study_uid
        self.shots = shots
        self.console: list[str] = []
        self.expected_series: list[str] = []
        self.crashed = False  # OHIF's route failed (OHIF-1): reopen before the next step
        # OHIF keeps state between a SEG opened on the DWI and a map fused over it (a map loaded
        # after SEGs is not drawn; a SEG opened after a map shows the map's colours too): each
        # phase starts on a freshly opened study (OHIF-5)
        self.phase = "fresh"
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    def open(self, expected_series: list[str]) -> None:
        """Open the study and wait until OHIF has a display set of each of ``expected_series``."""
        self.expected_series = expected_series
        self.phase = "fresh"
        self.page.goto(self.front.study_url(self.study_uid))
        self.page.wait_for_function(
            "(uids) => { if (!window.services) return false;"
            " const have = new Set(window.services.displaySetService.getActiveDisplaySets()"
            ".map(d => d.SeriesInstanceUID)); return uids.every(u => have.has(u)); }",
            arg=expected_series, timeout=90_000)
        # and the hanging protocol's first image is up: a series loaded before it would be replaced
        self.page.wait_for_function(
            "() => { const e = window.cornerstone && window.cornerstone.getRenderingEngines()[0];"
            " const v = e && e.getViewport('default'); return !!v && !!v.getCurrentImageId(); }", timeout=60_000)

    def display_set(self, series_uid: str) -> dict:
        sets = [d for d in self.page.evaluate(JS_DISPLAY_SETS) if d["series"] == series_uid]
        assert len(sets) == 1, f"OHIF made {len(sets)} display sets of series {series_uid}"
        return sets[0]

    def load(self, uid: str) -> None:
        self.page.evaluate(JS_LOAD, uid)

    def ready(self) -> None:
        """Reopen the study if OHIF's route failed (after the SR, OHIF-1)."""
        if self.crashed:
            self.crashed = False
            self.open(self.expected_series)

    def show_dwi(self, dwi_series: str) -> str:
        self.ready()
        uid = self.display_set(dwi_series)["uid"]
        self.load(uid)
        self.page.wait_for_function(f"() => ({JS_GRID})().includes('{uid}')", timeout=30_000)
        self.page.wait_for_function(
            "() => { const e = window.cornerstone.getRenderingEngines()[0]; const v = e && e.getViewport('default');"
            " return !!v && v.type === 'stack' && v.getImageIds().length > 0; }", timeout=60_000)
        return uid

    def enter(self, phase: str) -> None:
        """Start a phase ("seg" or "map") on a freshly opened study unless already in it."""
        if self.phase not in (phase, "fresh"):
            self.open(self.expected_series)
        self.phase = phase

    def hydrate_seg(self, seg_series: str, dwi_series: str) -> None:
        """Put the SEG on the DWI as a user does: double-click it (here: the same command), answer
        "Yes" to "Do you want to open this Segmentation?"; any earlier segmentation removed first."""
        self.enter("seg")
        dwi_uid = self.show_dwi(dwi_series)
        self.page.evaluate(JS_CLEAR_SEGS)
        seg_uid = self.display_set(seg_series)["uid"]
        self.load(seg_uid)
        self.page.wait_for_function(f"() => ({JS_SEG_IDS})().includes('{seg_uid}')", timeout=60_000)
        yes = self.page.get_by_text("Yes", exact=True)
        yes.wait_for(timeout=30_000)
        yes.click()
        self.page.wait_for_function(f"() => ({JS_GRID})().includes('{dwi_uid}')", timeout=30_000)

    def shot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture(scope="module")
def viewer(ohif_app, results, broken, tmp_path_factory):
    from playwright import sync_api as playwright_api

    dist = ohif_app
    shots = SHOTS if os.environ.get("SYNTHPERF_SCREENSHOTS") == "1" else tmp_path_factory.mktemp("shots")
    orthanc = OrthancServer(tmp_path_factory.mktemp("orthanc"), verbose=False)
    orthanc.start()
    front = None
    try:
        upstream = orthanc.dicomweb_url
        with httpx.Client(timeout=30) as http:
            for f in sorted(results.study_dir.rglob("*.dcm")):
                http.post(f"{orthanc.url}/instances", content=f.read_bytes()).raise_for_status()
        front = ViewerFront(dist, upstream).start()
        _stow(front.url + "/dicom-web", [*results.objects.values(), *results.overlays, *broken.values()])
        files = [results.objects[k] for k in ("tmax", "tmax_int", "seg", "sr")] + results.overlays[:1]
        wanted = sorted({_series(f) for f in [*files, *broken.values()]} | {_dwi_series(results)})
        with playwright_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1, service_workers="block")
            # OHIF's first-visit tour would cover the viewport
            context.add_init_script("localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
            view = Viewer(context.new_page(), front, results.study_uid, shots)
            view.open(wanted)
            yield view
            browser.close()
    finally:
        if front is not None:
            front.stop()
        orthanc.stop()


def _stow(url: str, files: list[Path]) -> None:
    """Our objects into the PACS by STOW-RS, through the viewer's origin (the proxy's POST path)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url)
    datasets = [pydicom.dcmread(f) for f in files]
    response = client.store_instances(datasets)
    failed = response.get("FailedSOPSequence") if response is not None else None
    assert not failed, f"STOW-RS refused: {failed}"
    stored = {item.ReferencedSOPInstanceUID for item in response.get("ReferencedSOPSequence", [])}
    assert stored == {ds.SOPInstanceUID for ds in datasets}, f"STOW-RS stored {len(stored)} of {len(datasets)}"


# ----------------------------------------------------------------------------------- SEG checks


@dataclass
class SegPoints:
    """Patient-coordinate points where the SEG's overlay must show (``present``) or not."""

    present: list[tuple[str, np.ndarray]]
    absent: list[tuple[str, np.ndarray]]


def _seg_union(path: Path) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """(union of all segments per slice ascending along the normal, each slice's position, row
    direction, column direction, (row, column) spacing) of our SEG file."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns).astype(bool)
    ipp = _frame_positions(ds)
    height = np.round(ipp @ _normal(ds), 3)
    levels = sorted(set(height))
    union = np.zeros((len(levels), ds.Rows, ds.Columns), bool)
    pos = [np.zeros(3)] * len(levels)
    for i, h in enumerate(height):
        k = levels.index(h)
        union[k] |= frames[i]
        pos[k] = ipp[i]
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float)
    return union, pos, iop[:3], iop[3:], spacing


def seg_points(seg_path: Path, tmax_path: Path) -> SegPoints:
    """Points on two slices, where the lesion starts and where it ends, chosen so that the SEG one
    slice off either way changes what shows at one of them; on each of those slices also a lesion
    point and a healthy one (whatever the neighbours hold). Few slices: each slice OHIF renders
    costs about a second on SwiftShader.

    A point counts when its 3x3 in-plane neighbourhood is all inside (or all outside) the union of
    the segments, so an outline drawn on the boundary never decides it.
    """
    from scipy.ndimage import binary_erosion

    union, pos, row, col, spacing = _seg_union(seg_path)
    tmax = pydicom.dcmread(tmax_path).pixel_array  # ascending frames, as stored (section 9)
    brain = tmax > 0
    st = np.zeros((1, 3, 3), bool)
    st[0] = True
    full = binary_erosion(union, st, border_value=0)  # all 3x3 inside
    empty = binary_erosion(~union & brain, st, border_value=0)  # all 3x3 outside, in the brain
    n = len(union)

    def shifted(mask: np.ndarray, dz: int) -> np.ndarray:
        """mask of slice k - dz at slice k (nothing beyond the volume)"""
        out = np.zeros_like(mask)
        if dz > 0:
            out[dz:] = mask[:-dz]
        else:
            out[:dz] = mask[-dz:]
        return out

    def pick(mask: np.ndarray, slices: set[int] | None = None) -> tuple[int, int, int] | None:
        idx = np.argwhere(mask)
        if slices:
            on = idx[np.isin(idx[:, 0], sorted(slices))]
            idx = on if len(on) else idx
        if not len(idx):
            return None
        centre = idx.mean(axis=0)
        return tuple(int(v) for v in idx[np.argmin(((idx - centre) ** 2).sum(axis=1))])

    chosen: list[tuple[str, tuple[int, int, int], bool]] = []
    # a SEG moved up by one shows slice k-1's mask on slice k: caught where k and k-1 differ
    for dz, side in ((+1, "below"), (-1, "above")):
        for name, mask, want in ((f"lesion, none {side}", full & shifted(empty, dz), True),
                                 (f"healthy, lesion {side}", empty & shifted(full, dz), False)):
            p = pick(mask)
            if p is not None:
                chosen.append((name, p, want))
                break
    used = {p[0] for _, p, _ in chosen}
    for name, mask, want in (("lesion", full, True), ("healthy", empty, False)):
        for k in sorted(used):
            p = pick(mask & (np.arange(n) == k)[:, None, None])
            if p is not None:
                chosen.append((name, p, want))

    def world(k: int, y: int, x: int) -> np.ndarray:
        return pos[k] + x * spacing[1] * row + y * spacing[0] * col

    present = [(f"{nm} (slice {p[0]}/{n}, row {p[1]}, col {p[2]})", world(*p)) for nm, p, w in chosen if w]
    absent = [(f"{nm} (slice {p[0]}/{n}, row {p[1]}, col {p[2]})", world(*p)) for nm, p, w in chosen if not w]
    return SegPoints(present, absent)


def seg_mismatches(view: Viewer, points: SegPoints) -> list[str]:
    """Where the screen disagrees with our SEG: overlay colour missing at a present point or shown
    at an absent one. Each point is looked at on its own DWI slice, chosen by patient position."""
    slices = view.page.evaluate(JS_STACK_SLICES)
    normal = np.cross(slices[0]["row"], slices[0]["col"])
    heights = np.asarray([np.dot(s["pos"], normal) for s in slices])
    todo: dict[int, list[tuple[str, np.ndarray, bool]]] = {}
    for want, group in ((True, points.present), (False, points.absent)):
        for name, p in group:
            k = int(np.argmin(np.abs(heights - np.dot(p, normal))))
            todo.setdefault(k, []).append((name, p, want))
    problems = []
    for k, items in sorted(todo.items()):
        for attempt in range(2):  # the labelmap of a slice may paint one frame after its image
            shown = view.page.evaluate(JS_SHOW_SLICE, {"index": k, "points": [p.tolist() for _, p, _ in items]})
            assert shown["index"] == k
            found = []
            for (name, _p, want), patch in zip(items, shown["rgb"], strict=True):
                px = np.asarray(patch, int)
                chroma = int(np.median(px.max(axis=1) - px.min(axis=1)))
                ok = chroma >= PRESENT_CHROMA if want else chroma <= ABSENT_CHROMA
                found.append((ok, f"{name}: overlay {'expected' if want else 'not expected'}, chroma {chroma}"))
            # a labelmap painted late would show as a missing overlay: look once more then
            late = any(not ok and want for (ok, _), (_, _, want) in zip(found, items, strict=True))
            if not late or attempt == 1:
                problems += [msg for ok, msg in found if not ok]
                break
            view.page.wait_for_timeout(500)
    return problems


# ----------------------------------------------------------------------------------- PM checks


def load_map(view: Viewer, map_series: str, dwi_series: str) -> dict:
    """Open a Parametric Map as a user does (OHIF fuses it over the DWI volume, which must be
    shown first: its loader needs the referenced volume) and read the volume OHIF built of it."""
    view.enter("map")
    view.show_dwi(dwi_series)
    uid = view.display_set(map_series)["uid"]
    view.load(uid)
    view.page.wait_for_function(f"() => ({JS_VOLUME})('{uid}') !== null", timeout=60_000)
    vol = view.page.evaluate(JS_VOLUME, uid)
    view.page.wait_for_timeout(500)  # the fused render follows the load
    return vol


def _map_on_ohif_grid(vol: dict, path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(OHIF's value, our value) at every voxel of our map, matched by patient position."""
    ds = pydicom.dcmread(path)
    ours = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns).astype(np.float64)
    ipp = _frame_positions(ds)
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    dr, dc = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float)
    nx, ny, nz = vol["dims"]
    theirs = np.asarray(vol["values"], np.float64).reshape(nz, ny, nx)
    axes = np.asarray(vol["direction"], float).reshape(3, 3)  # rows: i, j, k directions
    origin, spacing = np.asarray(vol["origin"], float), np.asarray(vol["spacing"], float)
    rows, cols = np.mgrid[0:ds.Rows, 0:ds.Columns]
    problems = []
    got, want = [], []
    for f, p in enumerate(ipp):
        world = p + cols[..., None] * dc * iop[:3] + rows[..., None] * dr * iop[3:]
        ijk = ((world - origin) @ axes.T) / spacing
        idx = np.rint(ijk).astype(int)
        if np.abs(ijk - idx).max() > 0.05 or (idx < 0).any() or (idx >= [nx, ny, nz]).any():
            problems.append(f"frame {f + 1} is not on OHIF's grid")
            continue
        got.append(theirs[idx[..., 2], idx[..., 1], idx[..., 0]])
        want.append(ours[f])
    return np.asarray(got), np.asarray(want), problems


def float_map_mismatches(vol: dict, path: Path) -> list[str]:
    got, want, problems = _map_on_ohif_grid(vol, path)
    if problems:
        return problems
    diff = np.abs(got / OHIF_X - want)
    bad = diff > 1e-3 + 1e-5 * np.abs(want)
    if bad.any():
        per_slice = [int(b.sum()) for b in bad]
        problems.append(f"{int(bad.sum())} of {bad.size} voxels differ from ours (max {diff.max():.3f} s); "
                        f"per slice {per_slice}")
    return problems


def int_map_mismatches(vol: dict, int_path: Path, float_path: Path) -> list[str]:
    """OHIF's values of the integer map, read in its documented unit (0.1 s), against our float
    Tmax at the same positions: within one step, except where our map saturates (> 32.7 s)."""
    got, stored, problems = _map_on_ohif_grid(vol, int_path)
    _, tmax, more = _map_on_ohif_grid(vol, float_path)
    problems += more
    if problems:
        return problems
    shown_s = got / OHIF_X * INT_STEP_S
    top = pydicom.dcmread(int_path, stop_before_pixels=True).SharedFunctionalGroupsSequence[0] \
        .RealWorldValueMappingSequence[0].RealWorldValueLastValueMapped
    valid = tmax < float(top) * INT_STEP_S
    diff = np.abs(shown_s - tmax)[valid]
    if (diff > INT_STEP_S + 1e-6).any():
        problems.append(f"{int((diff > INT_STEP_S + 1e-6).sum())} of {diff.size} voxels shown more than one step "
                        f"({INT_STEP_S} s) from our Tmax (max {diff.max():.2f} s)")
    return problems


# ----------------------------------------------------------------------------------- tests


def _series(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID


def _dwi_series(results: Results) -> str:
    seg = pydicom.dcmread(results.objects["seg"], stop_before_pixels=True)
    return seg.ReferencedSeriesSequence[0].SeriesInstanceUID


@pytest.fixture(scope="module")
def points(results) -> SegPoints:
    pts = seg_points(results.objects["seg"], results.objects["tmax"])
    names = [n for n, _ in pts.present + pts.absent]
    # the set must be able to see a one-slice shift both ways, or the test could not fail on one
    assert any(n.startswith(("lesion, none below", "healthy, lesion below")) for n in names), names
    assert any(n.startswith(("lesion, none above", "healthy, lesion above")) for n in names), names
    assert pts.present and pts.absent, names
    return pts


def test_float_tmax_map_holds_our_values_in_our_slice_order(viewer, results):
    vol = load_map(viewer, _series(results.objects["tmax"]), _dwi_series(results))
    assert vol["type"] == "Float32Array"
    assert not float_map_mismatches(vol, results.objects["tmax"])
    # and OHIF draws it, fused over the DWI (in its rainbow map, saturated: OHIF-3); the fused
    # layer sometimes misses the first render after its volume loads: render again, a few times
    coloured = 0.0
    for _ in range(10):
        rgb = np.asarray(viewer.page.evaluate(JS_CANVAS_GRID), int)
        coloured = float(((rgb.max(axis=1) - rgb.min(axis=1)) > 40).mean())
        if coloured > 0.01:
            break
        viewer.page.evaluate("() => window.cornerstone.getRenderingEngines()[0].getViewport('default').render()")
        viewer.page.wait_for_timeout(500)
    viewer.shot("ohif_pm_float")
    assert coloured > 0.01, "OHIF does not draw the float map over the DWI"


def test_integer_tmax_map_shows_our_values_within_its_step(viewer, results):
    """OHIF holds the integer map's values (x100); it does not draw this 16-bit map over the DWI
    here (headless Chromium, SwiftShader): OHIF-4, not asserted either way."""
    vol = load_map(viewer, _series(results.objects["tmax_int"]), _dwi_series(results))
    viewer.shot("ohif_pm_int")
    assert vol["type"] in ("Int16Array", "Uint16Array")
    assert not int_map_mismatches(vol, results.objects["tmax_int"], results.objects["tmax"])


def test_a_map_with_reversed_frames_is_caught(viewer, results, broken):
    vol = load_map(viewer, _series(broken["pm_reversed"]), _dwi_series(results))
    problems = float_map_mismatches(vol, results.objects["tmax"])
    assert problems and "per slice" in problems[0], problems


@pytest.mark.parametrize("name", ["int_units_0.01s", "int_two_steps_off"])
def test_an_integer_map_off_its_scale_is_caught(viewer, results, broken, name):
    vol = load_map(viewer, _series(broken[name]), _dwi_series(results))
    problems = int_map_mismatches(vol, results.objects["tmax_int"], results.objects["tmax"])
    assert problems, f"{name} showed within one step of our Tmax"


def test_seg_overlay_shows_at_lesion_points_and_not_at_healthy_ones(viewer, results, points):
    viewer.hydrate_seg(_series(results.objects["seg"]), _dwi_series(results))
    problems = seg_mismatches(viewer, points)
    viewer.page.evaluate(JS_SHOW_SLICE, {"index": _lesion_slice(viewer, results.objects["seg"]), "points": []})
    viewer.shot("ohif_seg")
    assert not problems, problems


def _lesion_slice(view: Viewer, seg_path: Path) -> int:
    """The DWI slice (stack index) where our SEG covers the most voxels: for the screenshot."""
    union, pos, row, col, _ = _seg_union(seg_path)
    widest = pos[int(union.sum(axis=(1, 2)).argmax())]
    slices = view.page.evaluate(JS_STACK_SLICES)
    normal = np.cross(slices[0]["row"], slices[0]["col"])
    heights = np.asarray([np.dot(s["pos"], normal) for s in slices])
    return int(np.argmin(np.abs(heights - np.dot(widest, normal))))


# both directions in the full form; make test's small form shifts up only (each costs 16-21 s of
# viewer time on 2 loaded cores)
@pytest.mark.parametrize("name", ["seg_up"] if small_scale() else ["seg_up", "seg_down"])
def test_a_seg_one_slice_off_is_caught(viewer, results, broken, points, name):
    viewer.hydrate_seg(_series(broken[name]), _dwi_series(results))
    problems = seg_mismatches(viewer, points)
    assert problems, f"{name}: the SEG one slice off showed as ours at every point"


def test_overlay_secondary_capture_shows_its_colour(viewer, results):
    """The overlay SC (series 905, RGB, burned in) in OHIF's stack viewport: on the middle slice a
    grid of canvas pixels over the brain, some of them coloured by our Tmax colour map."""
    viewer.ready()
    viewer.page.evaluate(JS_CLEAR_SEGS)  # no SEG colour may pass for the SC's own
    shown_set = viewer.display_set(_series(results.overlays[0]))
    assert shown_set["frames"] == len(results.overlays)
    viewer.load(shown_set["uid"])
    viewer.page.wait_for_function(f"() => ({JS_GRID})().includes('{shown_set['uid']}')", timeout=30_000)
    viewer.page.wait_for_function(
        "() => { const v = window.cornerstone.getRenderingEngines()[0].getViewport('default');"
        " return !!v && v.type === 'stack' && v.getImageIds().length > 1; }", timeout=30_000)
    mid = len(results.overlays) // 2
    viewer.page.evaluate(JS_SHOW_SLICE, {"index": mid, "points": []})
    viewer.page.wait_for_timeout(500)
    rgb = np.asarray(viewer.page.evaluate(JS_CANVAS_GRID), int)
    viewer.shot("ohif_overlay_sc")
    chroma = rgb.max(axis=1) - rgb.min(axis=1)
    assert (chroma > 60).sum() >= 10, "the overlay SC shows no colour in OHIF"


def test_sr_is_ohif_defect_1(viewer, results):
    """OHIF 3.13.2 fails on a TID 1500 SR whose measurements reference SEG segments (no SCOORD):
    ``measurement.coords[0].ReferencedSOPSequence`` of an empty coords list (OHIF-1 in
    docs/conformance.md). The SR itself is valid (test_validators: pixelmed, dcmqi, dsr2html).
    The viewer's route is dead afterwards: the page is reopened for any later use."""
    viewer.ready()
    seen = len(viewer.console)
    sr_uid = viewer.display_set(_series(results.objects["sr"]))["uid"]
    viewer.load(sr_uid)
    viewer.crashed = True
    deadline = time.monotonic() + 45
    crashed: list[str] = []
    while time.monotonic() < deadline and not crashed:
        viewer.page.wait_for_timeout(300)
        crashed = [c for c in viewer.console[seen:] if "ReferencedSOPSequence" in c]
    viewer.page.wait_for_timeout(1000)  # the error notice fades in
    viewer.shot("ohif_sr")
    assert crashed, ("OHIF no longer fails on our SR: it shows it now; update OHIF-1 in docs/conformance.md "
                     "and check what it displays")
    assert "Cannot read properties of undefined (reading 'ReferencedSOPSequence')" in crashed[0], crashed[0]
