"""``benchmarks.paired``'s statistics: the bootstrap interval of a median, pooling processes, and the
time verdict read from them (the rule every ours-vs-reference time target on the benchmark page uses)."""

from __future__ import annotations

import random
import statistics

from benchmarks.paired import abba, median_ci, pool, time_verdict


def test_median_ci_covers_the_median_narrows_with_more_data_and_is_seeded():
    rng = random.Random(1)
    small = [1 + rng.gauss(0, 0.02) for _ in range(10)]
    large = [1 + rng.gauss(0, 0.02) for _ in range(400)]
    lo, hi = median_ci(small)
    assert lo <= statistics.median(small) <= hi and min(small) <= lo and hi <= max(small)
    lo2, hi2 = median_ci(large)
    assert hi2 - lo2 < (hi - lo) / 2  # 40x the data: about a sixth of the width
    assert median_ci(small) == (lo, hi) and median_ci([1.5]) == (1.5, 1.5)


def test_abba_steps_in_order_and_pool_concatenates():
    calls = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    r = abba(steps, "a", "b", 3)
    assert calls == list("abba") * 3 and len(r["ratios"]) == 3 and len(r["ref_times"]) == len(r["method_times"]) == 6
    assert r["ci"][0] <= r["ratio"] <= r["ci"][1]
    parts = [dict(r, ratios=[0.9, 1.0, 1.1], ratio=1.0), dict(r, ratios=[1.2, 1.3, 1.4], ratio=1.3)]
    both = pool(parts)
    assert both["ratios"] == [0.9, 1.0, 1.1, 1.2, 1.3, 1.4] and both["ratio"] == statistics.median(both["ratios"])
    assert both["processes"] == 2 and both["process_ratios"] == [1.0, 1.3] and len(both["ref_times"]) == 12


def test_time_verdict_reads_the_interval_then_the_median():
    assert time_verdict({"ratio": 0.97, "q1": 0.9, "q3": 1.05, "ci": [0.95, 0.99]}) == "met"
    assert time_verdict({"ratio": 0.99, "q1": 0.9, "q3": 1.05, "ci": [0.97, 1.01]}) == "met at the median"
    assert time_verdict({"ratio": 1.01, "q1": 0.9, "q3": 1.05, "ci": [0.99, 1.03]}) == "within noise"
    assert time_verdict({"ratio": 1.05, "q1": 0.9, "q3": 1.2, "ci": [1.01, 1.08]}) == "**missed**"
    # Records made before the interval was kept: the interquartile range stands in for it.
    assert time_verdict({"ratio": 0.99, "q1": 0.98, "q3": 1.02}) == "met at the median"
    assert time_verdict({"ratio": 1.01, "q1": 0.99, "q3": 1.03}, target=1.02) == "met at the median"
    assert time_verdict(None) == "–" and time_verdict({"status": "skipped"}) == "–"


def test_interval_and_cell_fall_back_from_kept_ci_to_kept_ratios_to_the_iqr():
    from benchmarks.paired import cell, interval

    ratios = [0.95, 0.97, 0.99, 1.0, 1.02, 1.04]
    assert interval({"ratio": 0.995, "ci": [0.9, 1.1], "ratios": ratios}) == (0.9, 1.1, "CI")
    assert interval({"ratio": 0.995, "ratios": ratios, "q1": 0.0, "q3": 9.0}) == (*median_ci(ratios), "CI")
    assert interval({"ratio": 1.0, "q1": 0.98, "q3": 1.02}) == (0.98, 1.02, "IQR")
    assert cell({"ratio": 1.0, "q1": 0.98, "q3": 1.02}) == "1.000 (0.980–1.020 IQR)"
    assert cell({"ratio": 1.0, "ci": [0.99, 1.01]}, digits=2) == "1.00 (0.99–1.01)" and cell(None) == "–"
