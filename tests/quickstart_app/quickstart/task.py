"""The app's model and data, as a Flower quickstart has them: a small CNN (with BatchNorm) and DataLoaders.

The data is scikit-learn's digits (offline), served like a Hugging Face dataset
with a transform: every sample is a dict ``{"img": tensor, "label": int}``.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset


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


def load_data(partition_id: int, num_partitions: int, batch_size: int = 32):
    """This client's train DataLoader and the shared test DataLoader."""
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    labels = torch.tensor(digits.target)
    train, test = slice(0, 1400), slice(1400, None)
    mine = torch.arange(train.stop)[partition_id::num_partitions]
    trainloader = DataLoader(Digits(images[mine], labels[mine]), batch_size=batch_size, shuffle=True)
    testloader = DataLoader(Digits(images[test], labels[test]), batch_size=256)
    return trainloader, testloader


def train(model, trainloader, epochs, lr):
    """Plain (non-private) SGD: what the quickstart does before the conversion."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    total = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(batch["img"]), batch["label"])
            loss.backward()
            optimizer.step()
            total += float(loss)
    return total / max(len(trainloader), 1)


def test(model, testloader):
    """Loss and accuracy on the test set."""
    model.eval()
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for batch in testloader:
            outputs = model(batch["img"])
            total_loss += float(F.cross_entropy(outputs, batch["label"], reduction="sum"))
            correct += int((outputs.argmax(1) == batch["label"]).sum())
    return total_loss / len(testloader.dataset), correct / len(testloader.dataset)
