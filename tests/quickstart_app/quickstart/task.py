"""The app's model and data, with the functions Flower's quickstart-pytorch task module has.

A small CNN (with BatchNorm, so its state_dict holds buffers) and scikit-learn's
digits (offline) served like a Hugging Face dataset with a transform: every
sample is a dict ``{"img": tensor, "label": int}``. ``load_data`` gives a node
its partition split 80/20 into train and validation loaders;
``load_centralized_dataset`` the server's test loader; ``train`` and ``test``
take a ``device`` as the quickstart's do.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

TRAIN_EXAMPLES = 1400
"""Digits 0..1399 are split among the nodes; the rest is the server's test set."""


class Net(nn.Module):
    """Conv, BatchNorm, pool, two Linear layers (BatchNorm puts buffers in its state_dict)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm(self.conv(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Digits(Dataset):
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"img": self.images[index], "label": int(self.labels[index])}


def _digits():
    digits = load_digits()
    return torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None], torch.tensor(digits.target)


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """This node's partition: a train DataLoader (80%) and a validation DataLoader (20%)."""
    images, labels = _digits()
    mine = torch.arange(TRAIN_EXAMPLES)[partition_id::num_partitions]
    cut = int(0.8 * len(mine))
    trainloader = DataLoader(Digits(images[mine[:cut]], labels[mine[:cut]]), batch_size=batch_size, shuffle=True)
    valloader = DataLoader(Digits(images[mine[cut:]], labels[mine[cut:]]), batch_size=batch_size)
    return trainloader, valloader


def load_centralized_dataset():
    """The server's test set."""
    images, labels = _digits()
    return DataLoader(Digits(images[TRAIN_EXAMPLES:], labels[TRAIN_EXAMPLES:]), batch_size=128)


def train(net, trainloader, epochs, lr, device):
    """Plain (non-private) SGD: what the quickstart does before the conversion."""
    net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(batch["img"].to(device)), batch["label"].to(device))
            loss.backward()
            optimizer.step()
            total += float(loss)
    return total / max(epochs * len(trainloader), 1)


def test(net, testloader, device):
    """Mean loss per batch and accuracy."""
    net.to(device)
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in testloader:
            outputs = net(batch["img"].to(device))
            labels = batch["label"].to(device)
            loss += float(F.cross_entropy(outputs, labels))
            correct += int((outputs.argmax(1) == labels).sum())
    return loss / len(testloader), correct / len(testloader.dataset)
