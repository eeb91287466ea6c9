"""quickstart: a Flower / PyTorch app (ClientApp)."""

from dpsign_fl.flower import dp_sign_train
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from quickstart.task import Net, load_data
from quickstart.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""
    model = Net()
    trainloader, _ = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    return dp_sign_train(msg, context, model, trainloader, keys=("img", "label"))
