"""Tests of tanh-cnn-public-norm: normalisation with frozen statistics of a public set.

The statistics must come from the server's public set only, stay fixed while
clients release, travel with the model as statistics (never as votes), and
leave per-example gradients per example.
"""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dpsign_fl.data import public_images
from dpsign_fl.flower.records import load_arrays_into_model, model_to_arrays
from dpsign_fl.vote.model_sync import default_trainable
from dpsign_fl.models import PublicStatisticsNorm, build_model, fit_public_statistics, num_parameters
from dpsign_fl.parameters import trainable_parameters
from dpsign_fl.release import ReleaseSettings, client_release
from dpsign_fl.release.clipped_sum import clipped_gradient_sum

from .test_data import _write_tiny_mnist


def model_and_public_set():
    model = build_model("tanh-cnn-public-norm", input_shape=(1, 28, 28), num_classes=10, seed=0)
    public = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 0.7 + 0.2
    return model, public


def test_public_norm_adds_statistics_as_buffers_and_no_parameter():
    model, _ = model_and_public_set()
    plain = build_model("tanh-cnn", input_shape=(1, 28, 28), num_classes=10, seed=0)
    assert num_parameters(model) == num_parameters(plain) == 26010
    assert [name for name, _ in model.named_buffers()] == ["1.running_mean", "1.running_var", "5.running_mean", "5.running_var"]
    assert all(bool((b == (1 if n.endswith("var") else 0)).all()) for n, b in model.named_buffers())  # identity until fitted


def test_fitted_statistics_normalise_each_layer_input_on_the_public_set():
    model, public = model_and_public_set()
    fit_public_statistics(model, public)
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outputs.append(out)) for m in model.modules() if isinstance(m, PublicStatisticsNorm)]
    model(public)
    for hook in hooks:
        hook.remove()
    for out in outputs:
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(out.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.var(dim=(0, 2, 3), unbiased=False), torch.ones(out.shape[1]), atol=1e-3, rtol=0)


def test_statistics_stay_frozen_through_a_release_and_in_training_mode():
    model, public = model_and_public_set()
    fit_public_statistics(model, public)
    before = {n: b.clone() for n, b in model.named_buffers()}
    private = torch.randn(20, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 3  # unlike the public set
    model.train()
    client_release(model, private, torch.arange(20) % 10, ReleaseSettings(1.0, 1.0, 1.0), generator=torch.Generator().manual_seed(0))
    model(private)
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())


def test_clipped_sum_of_the_public_norm_model_equals_one_example_at_a_time():
    model, public = model_and_public_set()
    fit_public_statistics(model, public)
    inputs, targets = public[:5], torch.arange(5)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.zeros(num_parameters(model))
    for i in range(5):
        flat = torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(inputs[i : i + 1]), targets[i : i + 1]), params)])
        expected += flat * min(1.0, 0.1 / float(flat.norm()))
    for method in ("layers", "vmap"):
        total = clipped_gradient_sum(model, F.cross_entropy, inputs, targets, clip_norm=0.1, method=method)
        torch.testing.assert_close(total, expected, rtol=1e-4, atol=1e-6)


def test_statistics_travel_with_the_model_but_are_not_voted_on():
    server, public = model_and_public_set()
    fit_public_statistics(server, public)
    arrays = model_to_arrays(server)
    names = list(arrays.keys())
    assert names[: len(trainable_parameters(server))] == [n for n, _ in trainable_parameters(server)]
    values = {name: array.numpy() for name, array in arrays.items()}
    assert default_trainable(values) == tuple(n for n, _ in trainable_parameters(server))
    client, _ = model_and_public_set()
    load_arrays_into_model(client, arrays)
    assert all(torch.equal(a, b) for a, b in zip(client.buffers(), server.buffers()))


def test_the_public_set_is_the_other_datasets_first_images_normalised_as_the_private_data(tmp_path):
    (tmp_path / "fashion-mnist").mkdir()
    images, _ = _write_tiny_mnist(tmp_path / "fashion-mnist", compress=False)
    public = public_images("mnist", str(tmp_path), count=5)
    expected = (images[:5, None].astype(np.float32) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(public.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("name, data_dir, message", [("mnist", "", "data_dir must hold 'fashion-mnist'"), ("cifar10", "x", "dataset must be one of")])
def test_public_set_without_its_data_is_a_clear_error(name, data_dir, message):
    with pytest.raises(ValueError, match=message):
        public_images(name, data_dir)
