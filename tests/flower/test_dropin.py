"""dp_sign_train, the drop-in client step, and SignMajorityVote with a user's own model and data.

Driven in process: the strategy's real start() against an in-process Grid whose
nodes call dp_sign_train (as simulated nodes), like an existing Flower app.
"""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from dpsign_fl import SignMajorityVote
from dpsign_fl.flower import dp_sign_train
from dpsign_fl.flower.dropin import examples, privacy_settings
from dpsign_fl.flower.records import NODE_ERROR_CODE, NODE_ERROR_REASON, LEDGER_STATE_KEY, load_ledger
from dpsign_fl.settings import ConfigError
from dpsign_fl.flower.inprocess import InProcessGrid


RUN_CONFIG = {"target-epsilon": 4.0, "target-delta": 1e-5, "sample-rate": 0.5, "clip-norm": 1.0,
              "num-server-rounds": 3, "batch-size": 16}  # batch-size: the user's own key


pytestmark = pytest.mark.usefixtures("server_identity")


class Net(nn.Module):
    """A user's model with BatchNorm (running statistics in its state_dict)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.head(F.relu(self.norm(self.conv(x))).flatten(1))


class Samples(Dataset):
    """Dict samples, as a Hugging Face dataset with a transform gives them."""

    def __init__(self, count=60, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(count, 1, 8, 8, generator=generator)
        self.labels = torch.randint(0, 10, (count,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"img": self.images[index], "label": int(self.labels[index])}


def node_handler(**options):
    def handler(message, context):
        loader = DataLoader(Samples(seed=int(context.node_config["partition-id"])), batch_size=16)
        return dp_sign_train(message, context, Net(), loader, keys=("img", "label"), simulation=True, **options)

    return handler


def run(run_config=RUN_CONFIG, rounds=3, **strategy_options):
    grid = InProcessGrid(run_config, 3, handler=node_handler())
    strategy = SignMajorityVote(learning_rate=0.05, min_available_nodes=3, **strategy_options)
    initial = ArrayRecord(Net().state_dict())
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)
    return grid, initial, result


def test_a_state_dict_with_batchnorm_buffers_trains_with_every_client_voting():
    grid, initial, result = run()

    assert [result.train_metrics_clientapp[r]["voters"] for r in (1, 2, 3)] == [3, 3, 3]
    assert all(0 < result.train_metrics_clientapp[r]["epsilon"] <= 4.0 for r in (1, 2, 3))
    final = result.arrays
    # The votes cover the parameters; the BatchNorm statistics stay as the server sent them.
    assert list(final.keys()) == list(initial.keys())
    np.testing.assert_array_equal(final["norm.running_mean"].numpy(), initial["norm.running_mean"].numpy())
    assert not np.array_equal(final["head.weight"].numpy(), initial["head.weight"].numpy())


def test_each_release_is_in_the_nodes_ledger_with_the_run_configs_privacy_keys():
    grid, _, _ = run()
    for context in grid.contexts.values():
        ledger = load_ledger(context.state, accountant="pld")
        assert ledger.num_releases == 3 and ledger.releases[0].sample_rate == 0.5
        assert LEDGER_STATE_KEY in context.state


def test_train_data_may_be_a_dataset_a_dataloader_or_a_pair_of_tensors():
    dataset = Samples()
    from_dataset = examples(dataset, ("img", "label"))
    from_loader = examples(DataLoader(dataset, batch_size=7, shuffle=True), ("img", "label"))
    pair = (dataset.images, dataset.labels)
    for inputs, targets in (from_loader, examples(pair)):
        assert torch.equal(inputs, from_dataset[0]) and torch.equal(targets, from_dataset[1])


def test_dict_samples_without_keys_are_refused_naming_their_keys():
    with pytest.raises(TypeError, match=r"keys \['img', 'label'\]: pass keys="):
        examples(Samples())


def test_a_missing_privacy_key_is_an_error_naming_it_and_how_to_give_it():
    config = {k: v for k, v in RUN_CONFIG.items() if k != "sample-rate"}
    grid = InProcessGrid(config, 3, handler=node_handler())
    strategy = SignMajorityVote(learning_rate=0.05, min_available_nodes=3, max_failed_rounds=1)
    with pytest.raises(RuntimeError, match="needs sample-rate: add it to \\[tool.flwr.app.config\\].*or pass sample_rate="):
        strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=3)


def test_privacy_arguments_are_the_documented_keys_python_names_and_nothing_else():
    settings = privacy_settings(RUN_CONFIG, {"sample_rate": 0.25, "clipping": "automatic"})
    assert (settings.sample_rate, settings.clipping) == (0.25, "automatic")
    assert privacy_settings({**RUN_CONFIG, "participation": 0.25}, {}).participation == 0.25
    with pytest.raises(ConfigError, match=r"unknown privacy settings \['epsilon'\]"):
        privacy_settings(RUN_CONFIG, {"epsilon": 3.0})


def test_arguments_override_the_run_configs_privacy_keys():
    grid = InProcessGrid(RUN_CONFIG, 3, handler=node_handler(sample_rate=0.25))
    strategy = SignMajorityVote(learning_rate=0.05, min_available_nodes=3)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=1)
    for context in grid.contexts.values():
        assert load_ledger(context.state, accountant="pld").releases[0].sample_rate == 0.25


def test_a_run_whose_clients_all_keep_failing_stops_with_the_reason_negative_control_of_voting():
    # A client whose parameters are not the server's trainable arrays cannot take part.
    grid = InProcessGrid(RUN_CONFIG, 3, handler=node_handler())
    strategy = SignMajorityVote(learning_rate=0.05, min_available_nodes=3, trainable=["head.weight", "head.bias"])
    with pytest.raises(RuntimeError, match="3 rounds in a row got replies but no valid one; the last reason: .*trainable"):
        strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=5)


def test_targets_outside_the_models_outputs_are_refused_before_any_release_with_the_detail_only_in_the_nodes_log(caplog):
    bad = Samples()
    bad.labels[3] = 42
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config=dict(RUN_CONFIG))
    grid = InProcessGrid(RUN_CONFIG, 1, handler=None)
    strategy = SignMajorityVote(learning_rate=0.05, min_available_nodes=1, min_train_nodes=1)
    message = list(strategy.configure_train(1, ArrayRecord(Net().state_dict()), ConfigRecord(), grid))[0]
    reply = dp_sign_train(message, context, Net(), bad, keys=("img", "label"), simulation=True)
    assert reply.has_error() and (reply.error.code, reply.error.reason) == (NODE_ERROR_CODE, NODE_ERROR_REASON)
    assert "train_data targets must be class indices in [0, 10): 1 are not" in caplog.text
    assert LEDGER_STATE_KEY not in context.state
