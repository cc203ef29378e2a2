"""The benchmark entry (``python -m benchmarks`` / ``fr-megatron bench``) without running a
benchmark: argument checks, what --quick passes, the results summary; and the control-plane
simulation at 4 nodes: the controller decides a plan naming the silent node's ranks and every
simulated agent sees it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is not installed with the package
    sys.path.insert(0, str(REPO))

from benchmarks import __main__ as bench  # noqa: E402


@pytest.mark.timeout(30)
def test_only_unknown_benchmark_is_a_usage_error_naming_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--only", "nonexistent"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nonexistent" in err
    for name in ("detection", "rebuild_scale", "recovery", "control_plane"):
        assert name in err


@pytest.mark.timeout(60)
def test_cli_bench_works_from_another_directory(tmp_path):
    # `fr-megatron bench` outside the checkout still finds benchmarks/ (the CLI adds the root)
    p = subprocess.run([sys.executable, "-m", "fr_megatron.cli", "bench", "--only", "nope"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=50)
    assert p.returncode == 2, p.stderr
    assert "valid:" in p.stderr and "control_plane" in p.stderr
    p = subprocess.run([sys.executable, "-m", "fr_megatron.cli", "bench", "--list"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=50)
    assert p.returncode == 0, p.stderr
    assert "control_plane" in p.stdout


@pytest.mark.timeout(30)
def test_quick_is_passed_only_where_the_module_takes_it():
    assert bench.command("control_plane", True)[-1] == "--quick"
    assert "--quick" not in bench.command("control_plane", False)
    for name in bench.available():
        takes = bench._module_info(name)[1]
        cmd = bench.command(name, True)
        assert ("--quick" in cmd) == takes
        if not takes:
            assert cmd[3:] == bench.QUICK_ARGS.get(name, [])


@pytest.mark.timeout(30)
def test_readme_summarises_each_json(tmp_path):
    (tmp_path / "detection.json").write_text(json.dumps({
        "machine": {"cpus": 2, "python": "3.11"}, "hang_timeout_s": 2.0,
        "rows": [{"kind": "crash", "detect_p50_s": 0.15, "met": True}]}))
    (tmp_path / "broken.json").write_text("{not json")
    text = bench.write_readme(tmp_path).read_text()
    assert "## detection" in text and "cpus 2" in text
    assert "| kind | detect_p50_s | met |" in text and "| crash | 0.15 | yes |" in text
    assert "## broken" in text and "unreadable" in text


@pytest.mark.timeout(60)
def test_control_plane_simulation_at_four_nodes():
    from benchmarks.control_plane import run_scale

    row = run_scale(4, procs=1, interval=0.2, node_timeout=1.0, window=0.5,
                    say=lambda s: None)
    lost = row["lost_node"]
    assert row["plan_names_lost_ranks"], row
    assert set(row["plan_fault_ranks"]) == set(range(lost * 8, (lost + 1) * 8))
    assert row["agents_saw_plan"] == row["agents_expected"] == 4  # 3 live nodes + the spare
    assert row["see_plan_s"] is not None and row["hb_req_per_s"] > 0
    assert not row["sim_errors"]
    assert row["trigger"] == "node_lost" and row["plan_fault_kinds"] == ["node_lost"]
    assert row["detect_s"] is not None
