"""AD stages compared by donor: t intervals over donor means, the smallest detectable effect,
and a trend test across ordered stages whose p-values are uniform under the null."""

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.power import TTestPower

from superweights.ablate import AblateSettings, _strata, _trend, detectable_mean, stage_rank

ADNC = "Overall AD neuropathological Change"
STAGES = ["Not AD", "Low", "Intermediate", "High"]


def cells_of(donor_effects: dict, cells_per_donor: dict, stages: dict, seed: int = 0):
    """One candidate's per-cell table and the matching obs: each donor's cells scatter
    around the donor's effect."""
    rng = np.random.default_rng(seed)
    donors = np.concatenate([[d] * cells_per_donor[d] for d in donor_effects])
    effect = np.array([donor_effects[d] for d in donors]) + rng.normal(0, 0.01, len(donors))
    cells = pd.DataFrame(
        {
            "candidate": "L1[2,3]",
            "donor": donors,
            "cell_type": "Astro",
            "effect": effect,
            "spike": 50.0 + rng.normal(0, 1, len(donors)),
        }
    )
    obs = pd.DataFrame({ADNC: [stages[d] for d in donors], "donor": donors})
    return cells, obs


def test_detectable_effect_equals_statsmodels_power_analysis():
    for n in (2, 3, 6, 12, 40):
        expected = TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8)
        assert detectable_mean(n, 0.3) == pytest.approx(0.3 * expected, rel=1e-5)
    assert np.isnan(detectable_mean(1, 0.3)) and np.isnan(detectable_mean(5, 0.0))


def test_strata_are_compared_by_donor_and_small_ones_are_listed_only():
    effects = {f"d{i}": 0.1 * i for i in range(8)}
    sizes = {d: 1 for d in effects} | {"d7": 200}  # one donor with most of the cells
    stages = {d: ("High" if d in ("d0", "d1") else "Low") for d in effects}
    cells, obs = cells_of(effects, sizes, stages)
    table = _strata(cells, obs, AblateSettings()).set_index(["stratum", "value"])
    astro = table.loc[("cell type", "Astro")]
    # The donors' mean, not the cells' (which donor d7 would dominate at 0.7).
    assert astro.effect == pytest.approx(np.mean(list(effects.values())), abs=0.01)
    assert astro.n_donors == 8 and astro.ci_low < astro.effect < astro.ci_high
    assert astro.mde == pytest.approx(detectable_mean(8, np.std(list(effects.values()), ddof=1)),
                                      rel=0.05)  # fmt: skip
    assert table.loc[(ADNC, "Low")].status == "compared"
    high = table.loc[(ADNC, "High")]
    assert high.status == "too few donors (2 < 6)" and np.isnan(high.effect)
    assert high.n_donors == 2 and high.n_cells == 2


def test_stage_ranks():
    assert [stage_rank(s) for s in STAGES] == [0, 1, 2, 3]
    assert [stage_rank(s) for s in ("Braak 0", "Braak III", "Braak VI", "4")] == [0, 3, 6, 4]
    assert np.isnan(stage_rank("Reference")) and np.isnan(stage_rank(None))


def test_trend_finds_a_rise_with_stage_and_is_calibrated_under_the_null():
    settings = AblateSettings(n_permutations=999)
    donors = [f"d{i}" for i in range(16)]
    stages = {d: STAGES[i % 4] for i, d in enumerate(donors)}
    rising = {d: 0.1 * stage_rank(stages[d]) + 0.01 * i for i, d in enumerate(donors)}
    cells, obs = cells_of(rising, dict.fromkeys(donors, 5), stages)
    (row,) = _trend(cells, obs, settings).itertuples()
    assert row.rho > 0.8 and row.p_value < 0.005 and row.n_donors == 16 and row.n_stages == 4
    assert 0 < row.mde_rho < 1
    # Donor effects unrelated to stage: P(p <= 0.1) should be 0.1 over 200 data sets;
    # Binomial(200, 0.1) has mean 20 and sd 4.2; we accept 8..33 (3 sd).
    hits = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        effects = dict(zip(donors, rng.normal(0, 1, len(donors)), strict=True))
        cells, obs = cells_of(effects, dict.fromkeys(donors, 2), stages, seed)
        hits += int(_trend(cells, obs, settings)["p_value"].iloc[0] <= 0.1)
    assert 8 <= hits <= 33


def test_too_few_donors_for_a_trend_is_said():
    donors = {f"d{i}": 0.1 for i in range(4)}
    cells, obs = cells_of(donors, dict.fromkeys(donors, 3), dict.fromkeys(donors, "Low"))
    (row,) = _trend(cells, obs, AblateSettings()).itertuples()
    assert np.isnan(row.rho) and row.status.startswith("too few donors or stages (4 donors, 1")
