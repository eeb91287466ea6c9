"""The benchmark command runs end to end in --quick mode and writes every section (not a timing test)."""

import json

from dpsign_fl.bench.__main__ import main


def test_quick_benchmark_prints_one_table_and_writes_every_measurement(tmp_path, capsys):
    assert main(["--quick", "--json", str(tmp_path / "bench.json")]) == 0

    table = capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text())
    assert table.startswith("| stage | setting | measured | reference |")
    for stage in ("uplink bits/coordinate", "downlink bits/coordinate", "vote vs copying", "robust vote", "client step vs non-private"):
        assert stage in table
    assert {"wire", "vote", "client_step"} <= set(report)
    cifar = next(r for r in report["wire"] if r["model"] == "cifar-cnn")
    assert 1.0 <= cifar["uplink_bits_per_coordinate"] < 1.001  # raw packed bits, no header
    assert cifar["downlink_tied_vote_bits_per_coordinate"] < 1.61


def test_the_apps_round_without_the_simulation_engine_runs_every_round_in_this_process():
    from flwr.supercore.task_identity import TaskIdentity

    from dpsign_fl.bench.flower_round import measure_app_round

    before = TaskIdentity._run_id
    result = measure_app_round(num_clients=3, num_rounds=3)

    assert result["rounds"] == 3 and result["clients"] == 3
    assert 0 < result["seconds_per_round_min"] <= result["seconds_per_round"]
    assert TaskIdentity._run_id == before  # the server's task identity is restored after the run
