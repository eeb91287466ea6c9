"""quickstart: a Flower / PyTorch app (ServerApp)."""

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from quickstart.task import Net, load_data
from quickstart.task import test as test_fn

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the strategy, evaluating the global model on the server's test set."""
    lr = context.run_config["lr"]
    model = Net()
    _, testloader = load_data(0, 1)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test_fn(model, testloader)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    strategy = FedAvg(fraction_train=context.run_config["fraction-train"])
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), train_config=ConfigRecord({"lr": lr}),
        num_rounds=context.run_config["num-server-rounds"], evaluate_fn=evaluate,
    )
    if context.run_config["results-dir"]:
        rounds = {r: dict(metrics) for r, metrics in result.train_metrics_clientapp.items()}
        (Path(context.run_config["results-dir"]) / "train_metrics.json").write_text(json.dumps(rounds))
