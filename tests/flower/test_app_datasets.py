"""The Flower app takes every dataset, model and partitioner through the run config.

The ServerApp body (run_server) drives the real SignMajorityVote against our
ClientApp handler through an in-process Grid: the same code as `flwr run`, minus Ray.
"""

import json
import logging
import os
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from dpsign_fl.flower.client import clear_data_cache
from dpsign_fl.experiments.hooks import FLOWER_EXPERIMENTS
from dpsign_fl.flower.server import run_server
from dpsign_fl.flower.inprocess import InProcessGrid

from ..test_settings import pyproject_defaults
from ..test_data import _write_tiny_cifar

SHARED_DATA = Path(os.environ.get("DPSIGN_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data"))


@pytest.fixture(autouse=True)
def fresh_data_cache(server_identity):
    yield
    clear_data_cache()


def run_app(tmp_path, *, num_nodes=3, **overrides):
    run_config = dict(pyproject_defaults())
    run_config.update({"num-server-rounds": 2, "model-seed": 1, "reproducible-noise": True, "noise-seed": 1, "results-dir": str(tmp_path / "results")})
    run_config.update(overrides)
    grid = InProcessGrid(run_config, num_nodes)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    run_server(grid, context, experiments=FLOWER_EXPERIMENTS)  # as server_app.py does
    return json.loads((tmp_path / "results" / "metrics.json").read_text())


def needs_shared(folder):
    if not (SHARED_DATA / folder).is_dir():
        pytest.skip(f"no offline copy of {folder} at {SHARED_DATA}; set DPSIGN_DATA_DIR")
    return str(SHARED_DATA)


@pytest.mark.parametrize(
    "overrides",
    [
        {"partitioner": "dirichlet", "dirichlet-alpha": 0.5},
        {"partitioner": "pathological", "classes-per-partition": 2},
        {"model": "logreg", "clipping": "automatic", "accountant": "rdp"},
        {"lr-schedule": "cosine", "server-momentum": 0.5, "learning-rate": 0.02},
    ],
    ids=["dirichlet", "pathological", "logreg-automatic-rdp", "cosine-momentum"],
)
def test_digits_variants_run_every_round_with_every_client_voting(tmp_path, overrides):
    rows = run_app(tmp_path, **overrides)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["voters"] == 3 and r["dropped"] == 0 for r in rows)
    assert 0 < rows[-1]["epsilon"] <= 8.0


def test_mushroom_with_logistic_regression_from_a_data_dir(tmp_path):
    rows = run_app(tmp_path, dataset="mushroom", **{"data-dir": needs_shared("mushroom")})
    assert all(r["voters"] == 3 for r in rows)
    assert rows[-1]["payload-bytes"] == (117 * 2 + 2 + 7) // 8  # logreg: 117 x 2 weights + 2 biases


def test_mnist_with_the_tanh_cnn_from_a_data_dir(tmp_path):
    rows = run_app(tmp_path, dataset="mnist", **{"data-dir": needs_shared("mnist"), "sample-rate": 0.01})
    assert all(r["voters"] == 3 for r in rows)
    assert rows[-1]["payload-bytes"] == (26010 + 7) // 8


def test_cifar10_in_the_standard_layout_with_the_groupnorm_cnn(tmp_path):
    folder = _write_tiny_cifar(tmp_path)
    rows = run_app(tmp_path, dataset="cifar10", **{"data-dir": str(folder), "sample-rate": 0.5})
    assert all(r["voters"] == 3 for r in rows)
    assert rows[-1]["accuracy"] is not None


def test_the_app_with_vote_robust_leaves_out_the_all_ones_nodes_every_round(tmp_path):
    rows = run_app(tmp_path, num_nodes=10, **{"vote": "robust", "byzantine-fraction": 0.3, "byzantine-attack": "all-ones"})
    assert [row["excluded"] for row in rows] == [3, 3]
    assert [row["voters"] for row in rows] == [10, 10]  # valid replies; the vote counted 7 of them


@pytest.mark.parametrize(
    ("attack", "needs"),
    [("inverse-majority", "every honest client's bits of the round"), ("targeted-push", "the attackers' pooled data")],
)
def test_the_app_refuses_an_attack_whose_clients_act_together_saying_what_it_needs(tmp_path, attack, needs):
    from dpsign_fl.settings import ConfigError

    with pytest.raises(ConfigError, match=f"byzantine-attack '{attack}' needs {needs}"):
        run_app(tmp_path, **{"byzantine-fraction": 0.3, "byzantine-attack": attack})


def test_the_app_counts_in_numpy_without_a_c_compiler_and_refuses_an_unknown_kernel(tmp_path, monkeypatch, fresh_vote_kernel):
    from unittest import mock

    from dpsign_fl.flower import server
    from dpsign_fl.settings import ConfigError

    monkeypatch.setenv("CC", "/nonexistent/cc")
    with mock.patch.object(server, "log", wraps=server.log) as log:
        rows = run_app(tmp_path)
    assert [r["voters"] for r in rows] == [3, 3]
    lines = [call.args[1] % call.args[2:] for call in log.call_args_list]
    assert any(line.startswith("votes are counted by the numpy kernel; the vote runs in numpy") for line in lines)

    monkeypatch.setenv("DPSIGN_FL_VOTE_KERNEL", "fast")
    with pytest.raises(ConfigError, match="DPSIGN_FL_VOTE_KERNEL must be one of"):
        run_app(tmp_path)


def test_shakespeare_roles_with_a_sized_char_transformer_vote_every_round(tmp_path):
    # Server and ClientApp build the model from the same size keys: any disagreement would
    # make the replies the wrong length (dropped), or the replicas' digests differ.
    from ..test_shakespeare import write_tiny_plays

    (tmp_path / "data").mkdir()
    folder = write_tiny_plays(tmp_path / "data")
    sizes = {"model-width": 32, "model-depth": 1, "model-previous-characters": 2}
    rows = run_app(tmp_path, dataset="shakespeare", partitioner="role", **{"data-dir": str(folder), "sample-rate": 0.5}, **sizes)

    d = 97 * 32 + 2 * 98 * 32 + 80 * 32 + (2 * 2 * 32 + 32 * 96 + 96 + 32 * 32 + 32 + 32 * 128 + 128 + 128 * 32 + 32) + 2 * 32 + 32 * 97 + 97
    assert all(r["voters"] == 3 and r["dropped"] == 0 for r in rows)
    assert rows[-1]["payload-bytes"] == (d + 7) // 8
    assert rows[-1]["accuracy"] is not None


def test_mnist_public_norm_pretrained_on_the_digits_with_fgsm_training_reports_robust_accuracy_and_every_client_votes(
    tmp_path, caplog
):
    from ..test_data import _write_tiny_mnist

    for name in ("mnist", "fashion-mnist"):
        (tmp_path / name).mkdir()
        _write_tiny_mnist(tmp_path / name, compress=False)
    caplog.set_level(logging.INFO)
    rows = run_app(tmp_path, dataset="mnist", model="tanh-cnn-public-norm", **{
        "data-dir": str(tmp_path), "sample-rate": 0.5, "adversarial-training": "fgsm-rs", "adv-epsilon": 0.1,
        "pretrain-steps": 10,
    })
    assert all(r["voters"] == 3 and r["dropped"] == 0 for r in rows)
    assert all(0 <= r["robust-accuracy"] <= r["accuracy"] for r in rows)
    assert "pretraining on the public set: step 10/10" in caplog.text


def test_the_app_trains_at_each_rounds_warmup_radius(tmp_path, monkeypatch):
    from ..test_adversarial import radii_used

    radii = radii_used(monkeypatch)
    run_app(tmp_path, model="mlp", **{"adversarial-training": "fgsm-rs", "adv-epsilon": 0.1, "adv-warmup-rounds": 4, "sample-rate": 0.5})

    assert radii == [0.025] * 3 + [0.05] * 3  # 3 nodes, rounds 1 and 2
