"""The report's arithmetic: the power-law fit of final loss vs FLOPs, and which loss a report shows."""
import math

from megaslm.sweeps.report import LOSS_NOTE, fit_power_law, loss_kind


def test_power_law_fit_recovers_its_parameters():
    a, b = 37.0, 0.071
    xs = [1e15, 3e15, 1e16, 4e16, 2e17]
    fit = fit_power_law(xs, [a * x ** -b for x in xs])
    assert fit is not None
    assert math.isclose(fit[0], a, rel_tol=1e-9) and math.isclose(fit[1], b, rel_tol=1e-9)
    # noisy points: still close
    noisy = [a * x ** -b * (1 + 0.01 * (-1) ** i) for i, x in enumerate(xs)]
    na, nb = fit_power_law(xs, noisy)
    assert abs(nb - b) < 0.01


def test_power_law_needs_two_distinct_compute_points():
    assert fit_power_law([1e15, 1e15], [3.0, 2.9]) is None
    assert fit_power_law([1e15], [3.0]) is None


def test_loss_kind_says_which_loss_is_shown():
    v = {"curve": [(1, 2.0)], "loss_kind": "validation"}
    t = {"curve": [(1, 2.0)], "loss_kind": "training"}
    assert loss_kind([v, v]) == "validation" and loss_kind([t]) == "training" and loss_kind([v, t]) == "mixed"
    assert loss_kind([]) == "training"
    assert "held-out" in LOSS_NOTE["validation"] and "training" in LOSS_NOTE["training"]
