"""llmapp: the ServerApp. Majority vote on the adapters only; the final adapters saved in PEFT's format."""

import json
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dpsign_fl import SignMajorityVote
from dpsign_fl.flower import adapter_arrays, save_adapters
from llmapp.task import build_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run num-server-rounds rounds; with out-dir, write metrics.json and the adapters (save_pretrained)."""
    model = build_model()
    strategy = SignMajorityVote(learning_rate=context.run_config["learning-rate"], min_available_nodes=3)
    result = strategy.start(grid=grid, initial_arrays=adapter_arrays(model),
                            num_rounds=context.run_config["num-server-rounds"])
    out = context.run_config["out-dir"]
    if out:
        save_adapters(model, result.arrays, Path(out) / "adapters")
        rounds = {str(r): dict(metrics) for r, metrics in result.train_metrics_clientapp.items()}
        sizes = {"adapter-coordinates": sum(p.numel() for p in model.parameters() if p.requires_grad),
                 "all-coordinates": sum(p.numel() for p in model.parameters())}
        (Path(out) / "metrics.json").write_text(json.dumps({"rounds": rounds, **sizes}, indent=1))
