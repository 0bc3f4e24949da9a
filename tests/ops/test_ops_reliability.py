"""benchmarks/reliability.py at small counts: real processes killed with SIGKILL (traffic-log writers, retrain runs
at random moments and at each step of the publish) and SIGTERM (retrain), crafted log records."""
import json
import os
import subprocess
import sys
from pathlib import Path

import benchmark_scripts
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def bench_module(name: str):
    return benchmark_scripts.load(name)


@pytest.mark.slow
def test_writer_kills_lose_no_acknowledged_record_and_the_next_open_leaves_no_temporaries(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(BENCH / "reliability.py"), "--writer-kills", "15", "--crafted", "200",
                           "--skip-retrain", "--skip-serve", "--json", str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "acknowledged records lost" in proc.stdout  # the table
    figures = json.loads(out.read_text())
    w = figures["writer_kills"]
    assert w["kills"] == 15 and w["acknowledged"] > 15
    assert w["lost"] == w["damaged"] == w["duplicated"] == 0
    assert w["stale_after_open"] == w["left_after_last_open"] == 0
    assert w["bystander_acknowledged"] > 0 and w["bystander_lost"] == 0
    c = figures["crafted"]
    assert c["reader_errors"] == 0 and c["intact_returned"] == c["intact"] == 200


def test_crafted_records_never_stop_the_reader(tmp_path):
    c = bench_module("reliability").crafted_records(tmp_path, 300, seed=1)
    assert c["reader_errors"] == 0 and c["intact_returned"] == 300 and c["warnings"] >= 1


@pytest.fixture(scope="module")
def setup(shared, tmp_path_factory):
    return bench_module("reliability_retrain").prepare(tmp_path_factory.mktemp("reliability"), shared, records=300)


@pytest.mark.slow
def test_retrain_killed_mid_run_and_mid_publish_keeps_current_loadable_and_the_next_run_leaves_no_litter(setup):
    rr = bench_module("reliability_retrain")
    figures = rr.retrain_kills(setup, kills=5, seed=1)
    assert figures["by_plan"] == {"fit": 1, "copy": 1, "renamed": 1, "pointed": 1, "logged": 1}, figures
    assert figures["loadable"] == 5
    assert figures["litter_seen_after_kills"] > 0  # the kills did leave something for the next run to clean
    assert figures["stale_after_next_run"] == 0
    assert figures["final_run_exit"] == 0 and figures["final_litter"] == 0, figures["final_litter_paths"]
    assert not list((setup["store"].root / ".work").iterdir())
    assert not list(setup["tmp"].iterdir())  # nothing in the runs' temp dir


@pytest.mark.slow
def test_sigterm_makes_retrain_remove_its_work_folder_and_settle_a_publish_by_itself(setup):
    rr = bench_module("reliability_retrain")
    figures = rr.retrain_sigterm(setup, stages=("fit", "renamed"))
    assert figures == {"sigterms": 2, "exit_143": 2, "left_behind": 0, "loadable": 2}
