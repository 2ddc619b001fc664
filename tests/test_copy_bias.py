"""bench.copy_bias: the model's first-code mass on the prompt's history against the targets'."""

import math

import numpy as np
import pytest

from bench.copy_bias import first_code_rows
from ttds_core.cases import Case


def test_mass_share_and_odds_ratio_of_history_first_codes():
    first = {0: 100, 1: 101, 2: 102, 3: 100}     # item -> its first SID token
    cols = [100, 101, 102]
    cases = [Case(0, "valid", [0], [0], 3),      # target's first token 100 is the history's
             Case(1, "valid", [1], [1], 2)]      # target's first token 102 is not
    probs = np.asarray([[0.6, 0.3, 0.1],          # mass on {100}: 0.6, top-1 100 (in history)
                        [0.2, 0.2, 0.6]])         # mass on {101}: 0.2, top-1 102 (not)
    got = first_code_rows(cases, first, cols, probs)
    assert got["model_mass_on_history_first_codes"] == pytest.approx(0.4)
    assert got["targets_with_a_history_first_code"] == 0.5
    assert got["top1_first_code_in_history"] == 0.5
    assert got["odds_ratio"] == pytest.approx((0.4 / 0.6) / 1.0, abs=1e-3)
    assert got["log_odds_ratio"] == pytest.approx(math.log(0.4 / 0.6), abs=1e-3)
