"""Shadow-validation arithmetic (common.shadow_stats) against independent computations: numpy for
Bland-Altman and Lin's CCC, scikit-learn's cohen_kappa_score when present, a hand-worked 2x2 table."""

from __future__ import annotations

import numpy as np
import pytest

from common.shadow_stats import REFERENCE_BAND, bland_altman, concordance, summarise, table_2x2


def test_bland_altman_matches_numpy():
    rng = np.random.default_rng(4)
    truth = rng.uniform(0, 200, 40)
    a = truth + rng.normal(5.0, 12.0, 40)
    ba = bland_altman(a.tolist(), truth.tolist())
    d = a - truth
    assert ba.n == 40
    assert ba.bias == pytest.approx(d.mean())
    assert ba.sd == pytest.approx(d.std(ddof=1))
    assert ba.lower == pytest.approx(d.mean() - 1.96 * d.std(ddof=1))
    assert ba.upper == pytest.approx(d.mean() + 1.96 * d.std(ddof=1))
    assert bland_altman([], []).bias is None
    one = bland_altman([10.0], [4.0])
    assert one.bias == 6.0 and one.sd is None and one.lower is None
    with pytest.raises(ValueError, match="same length"):
        bland_altman([1.0], [1.0, 2.0])


def test_concordance_is_lins_ccc():
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 150, 30)
    y = 0.8 * x + 10 + rng.normal(0, 8, 30)
    ref = 2 * np.cov(x, y, ddof=0)[0, 1] / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)
    assert concordance(x.tolist(), y.tolist()) == pytest.approx(ref)
    assert concordance(x.tolist(), x.tolist()) == pytest.approx(1.0)
    # perfectly correlated but shifted: Pearson 1, concordance below 1
    assert concordance(x.tolist(), (x + 30).tolist()) < 0.9
    assert concordance([1.0], [1.0]) is None
    assert concordance([2.0, 2.0], [2.0, 2.0]) is None


def test_2x2_kappa_and_discordance():
    # 20 both yes, 5 synthetic only, 10 DSC only, 15 neither: po = 0.7, pe = 0.5*0.6 + 0.5*0.4 = 0.5
    pairs = [(True, True)] * 20 + [(True, False)] * 5 + [(False, True)] * 10 + [(False, False)] * 15
    t = table_2x2(pairs)
    assert (t.both, t.synthetic_only, t.real_only, t.neither, t.n) == (20, 5, 10, 15, 50)
    assert t.kappa == pytest.approx(0.4)
    assert t.discordant_pct == pytest.approx(30.0)
    sk = pytest.importorskip("sklearn.metrics")
    assert t.kappa == pytest.approx(sk.cohen_kappa_score([p[0] for p in pairs], [p[1] for p in pairs]))
    assert table_2x2([]).kappa is None and table_2x2([]).discordant_pct is None
    assert table_2x2([(True, True)] * 3).kappa is None  # both raters constant: chance agreement 1


def test_summarise_against_the_reference_band():
    rows = [{"synthetic_t6_ml": s, "real_t6_ml": r, "dice_t6": d, "dice_t10": None, "synthetic_defuse3": sd,
             "real_defuse3": rd}
            for s, r, d, sd, rd in ((100.0, 90.0, 0.8, True, True), (40.0, 70.0, 0.6, False, True),
                                    (0.0, 0.0, None, False, False), (150.0, 140.0, 0.9, True, None))]
    out = summarise(rows)
    assert out["n"] == 4
    assert out["mean_abs_t6_diff_ml"] == pytest.approx((10 + 30 + 0 + 10) / 4)
    assert out["bland_altman_t6"]["bias"] == pytest.approx((10 - 30 + 0 + 10) / 4)
    assert out["mean_dice_t6"] == pytest.approx((0.8 + 0.6 + 0.9) / 3) and out["mean_dice_t10"] is None
    assert out["defuse3"]["n"] == 3 and out["defuse3"]["real_only"] == 1  # the record without a DSC call is left out
    assert out["defuse3"]["discordant_pct"] == pytest.approx(100 / 3)
    assert out["within_reference"] == {"defuse3": False, "t6_volume": True}  # 33 % > 7.4 %; 12.5 mL <= 20.5 mL
    assert out["reference"] == REFERENCE_BAND
    assert summarise([])["bland_altman_t6"]["bias"] is None
