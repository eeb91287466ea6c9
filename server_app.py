"""dpsign-fl ServerApp: majority vote of DP-SIGN bits, server-side evaluation (wiring only)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dpsign_fl.experiments.hooks import FLOWER_EXPERIMENTS
from dpsign_fl.flower.logs import plain_logs
from dpsign_fl.flower.server import run_server

plain_logs()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train with SignMajorityVote and write results to ``results-dir``."""
    run_server(grid, context, experiments=FLOWER_EXPERIMENTS)
