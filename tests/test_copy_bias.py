"""bench.copy_bias: the model's first-code mass on the prompt's history against the targets'."""

import math

import numpy as np
import pytest

from bench.copy_bias import first_code_rows
from ttds_core.cases import Case


def test_mass_share_and_odds_ratio_of_history_first_codes():
    codes = {0: [0, 1], 1: [1, 0], 2: [2, 2], 3: [0, 3]}
    col_code = [0, 1, 2]
    cases = [Case(0, "valid", [0], [0], 3),      # target's first code 0 is the history's
             Case(1, "valid", [1], [1], 2)]      # target's first code 2 is not
    probs = np.asarray([[0.6, 0.3, 0.1],          # mass on {0}: 0.6, top-1 code 0 (in history)
                        [0.2, 0.2, 0.6]])         # mass on {1}: 0.2, top-1 code 2 (not)
    got = first_code_rows(cases, codes, col_code, probs)
    assert got["model_mass_on_history_first_codes"] == pytest.approx(0.4)
    assert got["targets_with_a_history_first_code"] == 0.5
    assert got["top1_first_code_in_history"] == 0.5
    assert got["odds_ratio"] == pytest.approx((0.4 / 0.6) / 1.0, abs=1e-3)
    assert got["log_odds_ratio"] == pytest.approx(math.log(0.4 / 0.6), abs=1e-3)
