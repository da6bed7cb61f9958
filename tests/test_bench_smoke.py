"""The throughput benchmark still runs end to end (it never asserts on speed).

One round of one second per variant, against real uvicorn servers: with wrk
when it is installed, and always once with the Python fallback generator so
that path cannot rot where wrk is present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench.runner import Trial, summarize
from bench.throughput import main

pytestmark = pytest.mark.e2e


def run_bench(tmp_path: Path, generator: str) -> dict[str, Any]:
    out = tmp_path / f"{generator}.json"
    status = main(
        [
            "--variants",
            "bare,memory",
            "--rounds",
            "1",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--connections",
            "4",
            "--generator",
            generator,
            "--json",
            str(out),
        ]
    )
    assert status == 0
    document: dict[str, Any] = json.loads(out.read_text())
    return document


@pytest.mark.parametrize("generator", ["auto", "python"])
def test_throughput_runs_end_to_end(tmp_path: Path, generator: str) -> None:
    document = run_bench(tmp_path, generator)

    expected = generator if generator != "auto" else ("wrk" if shutil.which("wrk") else "python")
    assert document["complete"] is True
    assert document["environment"]["generator"] == expected
    assert [(t["round"], t["variant"]) for t in document["trials"]] == [(1, "bare"), (1, "memory")]
    for trial in document["trials"]:
        assert trial["generator"] == expected
        assert trial["problems"] == []
        assert trial["requests"] > 0  # it ran; how fast is for the benchmark to say
        assert trial["bad_status"] == 0
        assert trial["socket_errors"] == 0
    memory = document["summary"]["variants"]["memory"]
    assert document["summary"]["baseline"] == "bare"
    assert "ratio_rps" in memory
    assert "median_paired_ratio_rps" in memory


def test_unknown_variant_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["--variants", "bare,nonesuch", "--json", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_summary_pairs_each_round_with_its_baseline() -> None:
    def trial(round_no: int, variant: str, rps: float) -> Trial:
        return Trial(round_no, variant, "wrk", 0.0, 0.0, rps=rps)

    trials = [
        trial(1, "bare", 100.0),
        trial(1, "memory", 90.0),
        trial(2, "bare", 200.0),
        trial(2, "memory", 100.0),
        trial(3, "bare", 100.0),
        trial(3, "memory", 80.0),
    ]
    memory = summarize(trials, ["bare", "memory"])["variants"]["memory"]

    assert memory["median_rps"] == 90.0
    assert memory["ratio_rps"] == pytest.approx(0.9)  # 90 / median(100, 200, 100)
    assert memory["paired_ratios_rps"] == pytest.approx([0.9, 0.5, 0.8])
    assert memory["median_paired_ratio_rps"] == pytest.approx(0.8)
    assert "median_rps_per_cpu" not in memory  # no CPU figures recorded
