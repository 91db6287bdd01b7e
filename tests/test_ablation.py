"""``kvserve bench ablation --smoke``: every ablation writes its table and plot.

The smoke workloads are tiny and the machine is shared, so timings are not
asserted; what does not depend on timing is: the same tokens with and without
the KV cache, cache hits, paged memory beating max-length reservation, and the
engine's concurrency equal to the estimator's.
"""

from __future__ import annotations

import json

import pytest
import torch

from kvserve.bench.ablation import ABLATIONS
from kvserve.bench.ablations.attention_shapes import kv_head_variants
from kvserve.bench.ablations.common import markdown_table, percentile
from kvserve.bench.ablations.paged_memory import simulate_contiguous_admission
from kvserve.entrypoints.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    """One ``kvserve bench ablation --smoke`` run of every ablation, through the main CLI."""
    out = tmp_path_factory.mktemp("ablations")
    report = out / "docs" / "ABLATIONS.md"
    threads = torch.get_num_threads()
    assert main(["bench", "ablation", "--smoke", "--threads", "1", "--out", str(out / "report"),
                 "--report", str(report)]) == 0
    assert torch.get_num_threads() == threads
    return out / "report", report


@pytest.fixture(scope="module")
def metrics(smoke_report):
    return json.loads((smoke_report[0] / "results.json").read_text())


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_each_ablation_writes_a_table_and_a_png(smoke_report, name: str) -> None:
    out, _ = smoke_report
    text = (out / f"{name}.md").read_text()
    assert "| --- |" in text  # a markdown table
    for line in ("- Machine: ", "- Command: `kvserve bench ablation --smoke", "- Date: ",
                 "- Model: bench-tiny", f"]({name}.png)"):
        assert line in text, line
    png = (out / f"{name}.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


def test_the_combined_report_links_every_plot(smoke_report) -> None:
    out, report = smoke_report
    text = report.read_text()
    assert text.count("| --- |") >= len(ABLATIONS)
    for name in ABLATIONS:
        assert f"](../report/{name}.png)" in text, name
        assert (report.parent / ".." / "report" / f"{name}.png").is_file()


def test_kv_cache_on_and_off_generate_the_same_tokens(metrics) -> None:
    assert metrics["kv_cache"]["same_tokens"] == 1.0


def test_paged_blocks_waste_less_and_run_more_sequences(metrics) -> None:
    paged = metrics["paged_memory"]
    assert paged["waste_paged"] < paged["waste_contiguous_oracle"] < paged["waste_contiguous_max"]
    assert paged["max_seqs_paged"] > paged["max_seqs_contiguous_max"] == 4
    assert paged["mean_seqs_paged"] > paged["mean_seqs_contiguous_max"]


def test_prefix_cache_serves_the_system_prompt(metrics) -> None:
    prefix = metrics["prefix_caching"]
    assert prefix["hit_rate_off"] == 0
    assert prefix["hit_rate_on"] > 0.9


def test_static_batching_computes_padding_tokens(metrics) -> None:
    batching = metrics["batching"]
    assert batching["continuous_computed_tokens"] == batching["useful_tokens"]
    assert batching["static_computed_tokens"] > batching["useful_tokens"]


def test_attention_shapes_engine_matches_estimator(metrics) -> None:
    shapes = metrics["attention_shapes"]
    for kind in ("mha", "gqa", "mqa"):
        assert shapes[f"max_seqs_engine_{kind}"] == shapes[f"max_seqs_estimator_{kind}"]
    # bench-tiny: 4 query heads -> 4, 2, 1 kv heads of 16 dims, 2 layers, fp32.
    assert [shapes[f"kv_bytes_per_token_{k}"] for k in ("mha", "gqa", "mqa")] == [1024, 512, 256]


def test_chunked_prefill_reports_itl_and_ttft(metrics) -> None:
    chunked = metrics["chunked_prefill"]
    for mode in ("off", "on"):
        assert chunked[f"itl_max_s_{mode}"] >= chunked[f"itl_p99_s_{mode}"] > 0
        assert chunked[f"long_ttft_s_{mode}"] > 0


def test_which_runs_only_the_named_ablation(tmp_path) -> None:
    assert main(["bench", "ablation", "--smoke", "--which", "attention_shapes",
                 "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "attention_shapes.md", "attention_shapes.png", "results.json"]


def test_unknown_shape_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["bench", "ablation", "--shape", "nope", "--out", str(tmp_path)]) == 2
    assert "shape: unknown name 'nope'" in capsys.readouterr().err


def test_contiguous_admission_simulation() -> None:
    # Capacity 10: requests of 6, 4, 5 tokens. The first two fit; the third (5) fits
    # only after the 6-token one leaves, so at most 2 ever run together.
    # Steps: {0, 1}, {0}, {0}, {2}, {2} -> peak 2, mean 6 / 5.
    assert simulate_contiguous_admission([6, 4, 5], [3, 1, 2], 10) == (2, 1.2)
    assert simulate_contiguous_admission([2] * 5, [1] * 5, 10) == (5, 5)
    with pytest.raises(ValueError, match="never fits"):
        simulate_contiguous_admission([11], [1], 10)


def test_kv_head_variants() -> None:
    assert kv_head_variants(32, 8) == [("MHA", 32), ("GQA", 8), ("MQA", 1)]
    assert kv_head_variants(6, 6) == [("MHA", 6), ("GQA", 3), ("MQA", 1)]
    with pytest.raises(ValueError, match="no divisor"):
        kv_head_variants(7)


def test_helpers() -> None:
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([0, 10], 99) == pytest.approx(9.9)
    assert markdown_table(["a", "b"], [(1, "x")]) == "| a | b |\n| --- | ---: |\n| 1 | x |"
