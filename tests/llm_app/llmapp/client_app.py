"""llmapp: the ClientApp. A LoRA fine-tuning step becomes one DP-SIGN release of the adapters."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from dpsign_fl.flower import dp_sign_train
from llmapp.task import build_model, load_data

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """One private release of this node's adapter gradients (privacy keys from the run config)."""
    model = build_model()
    train_data = load_data(context.node_config["partition-id"])
    return dp_sign_train(msg, context, model, train_data)
