"""The core rule on a real stroke MRI: ISLES'22 sub-strokecase0001 (../shared/realdata/isles22).

What the data are (inspected by hand, 2 mm isotropic, 112 x 112 x 73, LAS voxel axes,
skull-stripped, no FLAIR, no lesion mask): ADC values have a brain median of 1.05 and a CSF
plateau near 3-4, i.e. units of 1e-3 mm^2/s. DWI shows several small, punctate, clearly
hyperintense foci with dark ADC in the *left* hemisphere (image right in radiological display):
the most conspicuous sits in the left corona radiata at voxel (i, j, k) = (68, 55, 50-52)
(DWI ~1.9x the brain median, ADC ~0.45-0.50e-3), another at (64-65, 57-58, 42-43) beside the
left lateral ventricle -- an embolic pattern in the left MCA territory. There are also
bilateral-symmetric bright, low-ADC patches in the temporal lobes next to the petrous bones
(k ~ 18-25, susceptibility artefact) and a globally bright cerebellum, neither of which is infarct.

So the test asserts: units detected as 1e-3 mm^2/s (and flagged as guessed); a small total core
(0.3-5 mL, the punctate lesions); the conspicuous left corona radiata lesion found; most of the
core in the left hemisphere (measure.compute_measures reports side "left" through the NIfTI
direction); nothing called core in the inferior third of the brain (posterior fossa and skull base).
The brain mask is the nonzero voxels, as the images are skull-stripped.

``python -m tests.unit.test_core_isles`` rewrites docs/core-isles22.png, the overlay for a person
to judge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.pipeline.core import CoreResult, segment_core
from worker.pipeline.measure import compute_measures

CASE = "isles22/sub-strokecase0001_ses-0001_{}.nii.gz"
LESION_IJK = (68, 55, 51)  # left corona radiata focus, voxel indices of the NIfTI (i, j, k)


def load_isles(realdata: Path) -> dict:
    """DWI, ADC (z, y, x), brain = nonzero, spacing (z, y, x), LPS direction for the (x, y, z) index axes."""
    import nibabel as nib

    imgs = {k: nib.load(str(realdata / CASE.format(k))) for k in ("dwi", "adc")}
    aff = imgs["dwi"].affine
    zooms = np.asarray(imgs["dwi"].header.get_zooms()[:3], float)
    assert np.allclose(aff, imgs["adc"].affine), "DWI and ADC grids differ"
    direction = np.diag([-1.0, -1.0, 1.0]) @ (aff[:3, :3] / zooms)  # RAS -> LPS, unit columns
    arr = {k: np.asarray(v.dataobj, dtype=np.float32).transpose(2, 1, 0) for k, v in imgs.items()}
    brain = (arr["dwi"] != 0) | (arr["adc"] != 0)
    return {"dwi": arr["dwi"], "adc": arr["adc"], "brain": brain, "spacing": tuple(zooms[::-1]),
            "direction": direction}


@pytest.fixture(scope="module")
def isles(realdata: Path) -> tuple[dict, CoreResult]:
    d = load_isles(realdata)
    return d, segment_core(d["adc"], d["dwi"], d["brain"], d["spacing"], direction=d["direction"])


def test_units_detected_as_1e3(isles: tuple[dict, CoreResult]) -> None:
    d, r = isles
    assert r.adc_units == "1e-3 mm2/s" and r.adc_scale == 1000.0 and r.units_guessed
    assert 0.9 < float(np.median(d["adc"][d["brain"] & (d["adc"] > 0)])) < 1.2


def test_core_found_where_the_lesion_is(isles: tuple[dict, CoreResult]) -> None:
    d, r = isles
    ml = float(np.prod(d["spacing"])) / 1000.0
    core_ml = float(r.mask.sum()) * ml
    assert 0.3 <= core_ml <= 5.0, core_ml
    # The conspicuous left corona radiata focus is in the core (within one voxel).
    i, j, k = LESION_IJK
    assert r.mask[k - 1 : k + 2, j - 1 : j + 2, i - 1 : i + 2].any()
    # Most of the core lies in the left hemisphere (x index runs to patient left here).
    mid = float(np.nonzero(d["brain"])[2].mean())
    xs = np.nonzero(r.mask)[2]
    assert (xs > mid).mean() > 0.6, (xs > mid).mean()
    m = compute_measures(r.mask, np.zeros_like(d["adc"]), d["brain"], ml, spacing_zyx=d["spacing"],
                         direction=d["direction"])
    assert m.side == "left" and m.core_ml == pytest.approx(core_ml)


def test_posterior_fossa_and_skull_base_not_called_core(isles: tuple[dict, CoreResult]) -> None:
    d, r = isles
    zs = np.flatnonzero(d["brain"].any(axis=(1, 2)))
    lowest_third = zs.min() + (zs.max() - zs.min()) // 3
    assert not r.mask[: lowest_third + 1].any()
    # ... and that is the rule's doing: ADC < 620e-6 alone fires there by the hundred.
    raw = d["brain"] & (d["adc"] > 0) & (d["adc"] * 1000 < 620)
    assert raw[: lowest_third + 1].sum() > 500


def render_overlay(d: dict, r: CoreResult, out: Path) -> None:
    """Axial DWI | ADC pairs with the core outlined, radiological view (patient left = image right).

    Every slice holding core is shown, plus two skull-base slices where the rule rejects artefacts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = sorted(set(np.flatnonzero(r.mask.any(axis=(1, 2))).tolist()) | {14, 22})
    ys, xs = np.nonzero(d["brain"].any(axis=0))
    crop = (slice(ys.min() - 2, ys.max() + 3), slice(xs.min() - 2, xs.max() + 3))
    vmax = float(np.percentile(d["dwi"][d["brain"]], 99.5))
    cols = 3
    rows = int(np.ceil(len(zs) / cols))
    fig, axes = plt.subplots(rows, cols * 2, figsize=(cols * 2 * 2.6, rows * 3.0), facecolor="black")
    for ax in np.ravel(axes):
        ax.axis("off")
    for n, z in enumerate(zs):
        core = np.flipud(r.mask[z][crop]).astype(float)
        for c, (img, hi, name) in enumerate(((d["dwi"][z], vmax, "DWI"), (d["adc"][z], 2.0, "ADC"))):
            ax = np.ravel(axes)[n * 2 + c]
            # Rows run posterior -> anterior: flip so anterior is at the top; x already runs to
            # patient left, which radiological display puts on the image right.
            ax.imshow(np.flipud(img[crop]), cmap="gray", vmin=0, vmax=hi, interpolation="nearest")
            if core.any():
                ax.contour(core, levels=[0.5], colors="red", linewidths=1.0)
            ax.set_title(f"{name}  k={z}", color="white", fontsize=8)
            ax.text(0.0, 0.02, "R", color="yellow", transform=ax.transAxes, fontsize=8)
            ax.text(0.94, 0.02, "L", color="yellow", transform=ax.transAxes, fontsize=8)
    ml = float(r.mask.sum()) * float(np.prod(d["spacing"])) / 1000.0
    fig.suptitle(
        f"ISLES'22 sub-strokecase0001 - synthperf core rule (ADC < 620e-6 mm2/s and DWI-bright), red = core, "
        f"{ml:.2f} mL\nradiological view (patient left on image right), anterior up - research software, "
        "NOT FOR DIAGNOSTIC USE",
        color="white", fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out, dpi=100, facecolor="black")
    plt.close(fig)


def test_overlay_renders(isles: tuple[dict, CoreResult], tmp_path: Path) -> None:
    d, r = isles
    out = tmp_path / "overlay.png"
    render_overlay(d, r, out)
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] > 600 and im.size[1] > 200


if __name__ == "__main__":
    from tests.conftest import REALDATA

    data = load_isles(REALDATA)
    res = segment_core(data["adc"], data["dwi"], data["brain"], data["spacing"], direction=data["direction"])
    target = Path(__file__).resolve().parents[2] / "docs" / "core-isles22.png"
    render_overlay(data, res, target)
    print(f"wrote {target}: {res.mask.sum()} voxels, warnings {res.warnings}")
