"""`kvserve bench streaming` on a tiny random Llama: the report's shape, and the methods scoring the same positions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvserve.bench.streaming import METHODS
from kvserve.entrypoints.cli import main

NUM_TOKENS, WINDOW, SINKS, BUCKET = 300, 32, 4, 100


@pytest.fixture(scope="module")
def report(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench-streaming")
    argv = ["bench", "streaming", "--model", str(tiny_llama), "--dtype", "float32", "--num-tokens", str(NUM_TOKENS),
            "--sliding-window", str(WINDOW), "--attention-sinks", str(SINKS), "--bucket", str(BUCKET),
            "--decode-tokens", "4", "--output", str(out / "report.json"), "--plot", str(out / "plot.png")]
    assert main(argv) == 0
    assert (out / "plot.png").stat().st_size > 0
    return json.loads((out / "report.json").read_text())


def test_report_has_a_bucket_row_and_a_value_per_position_for_every_method(report: dict) -> None:
    assert (report["num_tokens"], report["window"], report["attention_sinks"]) == (NUM_TOKENS, WINDOW, SINKS)
    assert [(row["start"], row["end"]) for row in report["buckets"]] == [(0, 100), (100, 200), (200, 300)]
    assert all(set(METHODS) <= set(row) for row in report["buckets"])
    for method in METHODS:
        per_position = report["per_position_nll"][method]
        assert len(per_position) == NUM_TOKENS and per_position[0] is None
    assert set(report["decode_tokens_per_s"]) == {"sinks_window", "window_recompute"}
    assert all(v > 0 for v in report["decode_tokens_per_s"].values())


def test_recompute_and_sinks_window_score_every_position_with_a_finite_perplexity(report: dict) -> None:
    for method in ("sinks_window", "window_recompute", "window"):
        values = report["per_position_nll"][method][1:]
        assert all(v is not None and math.isfinite(v) and v > 0 for v in values), method
        assert all(math.isfinite(row[method]) for row in report["buckets"])
    # the tiny model's context (512) holds the whole text, so dense scores every position too
    assert all(v is not None for v in report["per_position_nll"]["dense"][1:])


def test_methods_agree_while_no_token_has_left_the_window(report: dict) -> None:
    """Up to position W every method sees the whole prefix: the four must score it alike (a misaligned
    position or a wrong window would not)."""
    nll = report["per_position_nll"]
    for position in range(1, WINDOW + 1):
        for method in ("window", "sinks_window", "window_recompute"):
            assert nll[method][position] == pytest.approx(nll["dense"][position], abs=1e-3), (method, position)


def test_past_the_window_the_methods_differ(report: dict) -> None:
    nll = report["per_position_nll"]
    past = range(2 * WINDOW, NUM_TOKENS)
    assert max(abs(nll["window"][i] - nll["dense"][i]) for i in past) > 1e-3
    assert max(abs(nll["window_recompute"][i] - nll["window"][i]) for i in past) > 1e-3


def test_means_at_recompute_positions_use_the_same_positions(report: dict) -> None:
    """The summary that compares methods on one set of positions: recompute's, past W."""
    nll = report["per_position_nll"]
    positions = [i for i, v in enumerate(nll["window_recompute"]) if v is not None and i > WINDOW]
    for method, mean in report["mean_at_recompute_positions"].items():
        assert mean == pytest.approx(sum(nll[method][i] for i in positions) / len(positions), rel=1e-4), method
