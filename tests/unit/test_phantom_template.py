"""Phantom template family and domain randomisation (issue 15): the MNI template loads offline,
same seed gives the same files, every randomised property varies across seeds, the case mix holds
at least 15 % no-stroke studies."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from phantom.anatomy import CSF, GM, WM
from phantom.api import family_for, make_case, write_training_case
from phantom.randomise import CASE_TYPES, case_scenario

SEEDS = range(500, 512)  # 12 seeds: every property below varies over 10 already (checked)


@pytest.fixture(scope="module")
def batch():
    """12 domain-randomised cases of both families on the fast path (64 x 64 keeps it small)."""
    return [make_case(s, matrix=64, family="mixed", randomise=True) for s in SEEDS]


def test_template_loads_offline(monkeypatch):
    from phantom import template

    def refuse(*a, **k):
        raise OSError("network access attempted while loading the template")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    template.load_atlas.cache_clear()
    atlas = template.load_atlas()
    assert "ICBM152 2009" in atlas.source["template"] and "AAL" in atlas.source["labels"]
    assert set(np.unique(atlas.territory)) == set(range(9))
    # the real template, not a placeholder: brain 1.2-1.9 L, grey matter about half of the parenchyma
    brain_ml = float((atlas.shell[..., 0] > 0).sum()) * template.STEP_MM**3 / 1000
    assert 1200 < brain_ml < 1900, brain_ml
    frac = atlas.tissue[atlas.shell[..., 0] > 5].astype(np.float32) / 255
    gm = frac[:, 1].sum() + frac[:, 3].sum()
    assert 0.35 < gm / (gm + frac[:, 2].sum()) < 0.65
    case = make_case(4, matrix=64, family="template")
    assert case.truth["family"] == "template" and case.truth["template"]["template"] == atlas.source["template"]
    par = case.brain & np.isin(case.tissue, (GM, WM))
    assert (case.tissue[case.brain] == CSF).mean() > 0.05  # real sulci and ventricles
    # b0 is T2-weighted: grey matter brighter than white matter, as in the geometric family
    assert case.b0[par & (case.tissue == GM)].mean() > case.b0[par & (case.tissue == WM)].mean()


def test_same_seed_same_files_template_randomised(tmp_path):
    a = write_training_case(make_case(21, matrix=64, family="template", randomise=True), tmp_path / "a")
    b = write_training_case(make_case(21, matrix=64, family="template", randomise=True), tmp_path / "b")
    for p in sorted(a.iterdir()):
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    c = write_training_case(make_case(22, matrix=64, family="template", randomise=True), tmp_path / "c")
    assert (c / "dwi.nii.gz").read_bytes() != (a / "dwi.nii.gz").read_bytes()


def _measured(case) -> dict:
    """Properties measured on the images and truth of one case (what a network could see)."""
    t, dom = case.truth, case.truth["domain"]
    par = case.brain & ~case.core
    gm, wm, csf = (par & (case.tissue == k) for k in (GM, WM, CSF))
    bg = case.b0[:, :4, :4]
    return {
        "family": t["family"], "case_type": t["case_type"],
        "flair GM/WM (image)": round(float(np.median(case.flair_on_dwi[gm]) / np.median(case.flair_on_dwi[wm])), 2),
        "b0 GM/WM (image)": round(float(np.median(case.b0[gm]) / np.median(case.b0[wm])), 2),
        "flair CSF/WM (image)": round(float(np.median(case.flair_on_dwi[csf]) / np.median(case.flair_on_dwi[wm])), 2),
        "b0 WM level": round(float(np.median(case.b0[wm])), -1),
        "background noise": round(float(bg.std()), 1),
        "noise kind": dom["noise"], "bias dwi": dom["dwi_bias"], "blur dwi": dom["dwi_psf"],
        "slice thickness": t["acquisition"]["dwi"]["slice_thickness_mm"],
        "slice gap": t["acquisition"]["dwi"]["slice_gap_mm"], "slices": case.grid.shape[0],
        "partial volume": dom["partial_volume_samples"],
        "brain mL": round(float(case.brain.sum()) * case.grid.voxel_volume_mm3 / 1000, -1),
        "tilt": tuple(dom["tilt_deg"]), "shift": tuple(dom["shift_mm"]),
        "skull mm": dom["skull_mm"], "scalp s0": dom["scalp_s0"], "atrophy": dom["atrophy"],
        "wmh grade": dom["wmh_grade"], "old infarct": t["anatomy"]["old_infarct"] is not None,
        "fvh": dom["fvh"], "flow artefact": dom["flow_artefact"] > 0, "bright sulci": dom["bright_sulci"] > 0,
        "flair gamma": dom["flair_gamma"], "flair csf suppression": dom["flair_csf"],
        "penumbral cue": dom["penumbral_scale"],
    }


def test_every_randomised_property_varies_across_seeds(batch):
    table = {}
    for case in batch:
        for k, v in _measured(case).items():
            table.setdefault(k, []).append(v)
    print("\nproperty -> values over seeds", SEEDS.start, "..", SEEDS.stop - 1)
    for k, vals in table.items():
        print(f"  {k:24s} {len(set(vals)):2d} distinct: {vals[:8]}")
    for k, vals in table.items():
        assert len(set(vals)) >= 2, f"{k} does not vary over {len(SEEDS)} seeds: {vals}"
    # wide, not cosmetic: intensity ratios and levels spread over a real range
    assert np.ptp(table["flair GM/WM (image)"]) > 0.15 and np.ptp(table["flair CSF/WM (image)"]) > 0.2
    assert max(table["b0 WM level"]) > 2 * min(table["b0 WM level"])
    assert {"geometric", "template"} <= set(table["family"])
    assert min(table["penumbral cue"]) == 0.0 and max(table["penumbral cue"]) > 0.7  # absent .. full
    assert {"strong", "weak", "absent"} <= set(table["fvh"]) or len(set(table["fvh"])) >= 2
    # an absent-FVH case carries no FVH truth at all
    for case in batch:
        if case.truth["domain"]["fvh"] == "absent":
            assert case.truth["fvh_voxels"] == 0


def test_no_stroke_fraction_and_case_types(batch):
    kinds = [case_scenario(s)["case_type"] for s in range(2000, 2400)]
    frac = kinds.count("no-stroke") / len(kinds)
    assert frac >= 0.15, frac
    assert set(kinds) == set(CASE_TYPES)
    for case in batch:
        t = case.truth
        if t["case_type"] == "no-stroke":
            assert t["tmax6_ml"] == 0 and t["core_ml"] == 0 and not t["defuse3_target_mismatch"]
        if t["case_type"] == "tia":
            assert t["core_ml"] == 0 and t["tmax6_ml"] > 0
        if t["case_type"] == "lacunar":
            assert t["core_ml"] < 5 and t["tmax6_ml"] < 15 and not t["defuse3_target_mismatch"]


def test_cli_family_and_randomise_on_the_fast_path(tmp_path, capsys):
    import json

    from cli.main import main

    rc = main(["phantom", "--out", str(tmp_path), "--cases", "2", "--seed", "41", "--family", "mixed",
               "--randomise", "--training-only", "--workers", "1"])
    assert rc == 0
    truths = [json.loads((tmp_path / f"case_0000{s}" / "truth.json").read_text()) for s in (41, 42)]
    assert all(t["randomised"] and "domain" in t and t["family"] in ("geometric", "template") for t in truths)
    assert [t["family"] for t in truths] == [family_for(s, "mixed") for s in (41, 42)]
    assert "[2/2]" in capsys.readouterr().out
    # --penumbral-cue pins the cue for the set; without --randomise it is refused, naming the option
    rc = main(["phantom", "--out", str(tmp_path / "off"), "--seed", "41", "--randomise", "--training-only",
               "--workers", "1", "--penumbral-cue", "0"])
    assert rc == 0
    assert json.loads((tmp_path / "off" / "case_000041" / "truth.json").read_text())["domain"]["penumbral_scale"] == 0
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--penumbral-cue", "0"]) == 2
    assert "--penumbral-cue" in capsys.readouterr().err
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--grey-contrast", "1.5"]) == 2
    assert "--grey-contrast" in capsys.readouterr().err
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--randomise", "--grey-contrast-in", "dwi"]) == 2
    assert "--grey-contrast-in: needs --grey-contrast" in capsys.readouterr().err


def test_penumbral_cue_is_drawn_apart_from_the_case_type():
    """Every cue strength occurs with every kind of stroke: a draw that shared its seed stream with the
    case mix once gave the full cue only to no-stroke, lacunar and TIA-like cases (caught in session 18)."""
    from phantom.randomise import penumbral_scale_draw

    seen: dict[str, set[str]] = {}
    for seed in range(400):
        sc = penumbral_scale_draw(seed)
        cue = "absent" if sc == 0 else ("weak" if sc < 0.65 else "full")
        seen.setdefault(case_scenario(seed)["case_type"], set()).add(cue)
    assert set(seen) == set(CASE_TYPES)
    for kind, cues in seen.items():
        assert cues == {"absent", "weak", "full"}, (kind, cues)
