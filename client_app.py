"""dpsign-fl ClientApp: one DP-SIGN release per round (wiring only)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from dpsign_fl.experiments.hooks import FLOWER_EXPERIMENTS
from dpsign_fl.flower.client import handle_train
from dpsign_fl.flower.logs import plain_logs

plain_logs()
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Reply with this node's packed DP-SIGN bits, or refuse when over budget.

    The experiments' seam (synthetic gradient noise, Byzantine clients) acts in
    Flower's simulation engine only; a deployed SuperNode ignores those keys.
    """
    return handle_train(msg, context, experiments=FLOWER_EXPERIMENTS)
