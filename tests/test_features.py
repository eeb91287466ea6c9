"""ScatterNet features: kymatio's transform, per example, cached once, and the models that take them."""

import builtins
import os

import pytest
import torch

from dpsign_fl.data import features
from dpsign_fl.data.loading import Dataset
from dpsign_fl.cache import cache_dir
from dpsign_fl.data.features import load_run_dataset, scattering_features
from dpsign_fl.release.mechanism import per_sample_gradients
from dpsign_fl.models import build_model, input_features, num_parameters
from dpsign_fl.settings import RunSettings

kymatio_torch = pytest.importorskip("kymatio.torch")


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DPSIGN_FL_CACHE", str(tmp_path / "cache"))


def images(count, shape=(1, 8, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    train = torch.randn(count, *shape, generator=generator)
    test = torch.randn(5, *shape, generator=generator)
    return Dataset(train, torch.arange(count) % 3, test, torch.arange(5) % 3, num_classes=3, name="synthetic")


def test_features_are_kymatios_scattering_with_81_channels_per_input_channel():
    dataset = images(7, shape=(3, 8, 8))
    out = scattering_features(dataset)
    direct = kymatio_torch.Scattering2D(J=2, shape=(8, 8), L=8)(dataset.train_inputs).reshape(7, 243, 2, 2)
    assert out.train_inputs.shape == (7, 243, 2, 2) and out.test_inputs.shape == (5, 243, 2, 2)
    torch.testing.assert_close(out.train_inputs, direct)
    assert torch.equal(out.train_targets, dataset.train_targets)


def test_an_example_s_features_depend_on_that_example_only():
    # The privacy argument of docs/privacy.md: the transform is per example, so removing one changes nothing else.
    dataset = images(9)
    fewer = Dataset(dataset.train_inputs[1:], dataset.train_targets[1:], dataset.test_inputs, dataset.test_targets, 3, "synthetic")
    torch.testing.assert_close(scattering_features(fewer).train_inputs, scattering_features(dataset).train_inputs[1:])


def test_features_are_computed_once_and_read_back_from_the_cache(monkeypatch):
    dataset = images(6, seed=3)
    first = scattering_features(dataset)
    cached = list((cache_dir() / "features").glob("synthetic-scattering-J2-*.pt"))
    assert len(cached) == 1

    def no_recompute(*_, **__):
        raise AssertionError("computed again despite the cache")

    monkeypatch.setattr(features, "_transform", no_recompute)
    again = scattering_features(dataset)
    assert torch.equal(again.train_inputs, first.train_inputs) and torch.equal(again.test_inputs, first.test_inputs)
    with pytest.raises(AssertionError, match="computed again"):  # other inputs are another cache entry
        scattering_features(images(6, seed=4))


def test_a_damaged_cache_file_is_computed_again(caplog):
    dataset = images(4, seed=5)
    expected = scattering_features(dataset).train_inputs.clone()
    for path in (cache_dir() / "features").glob("synthetic-*.pt"):
        path.write_bytes(b"not a torch file")
    with caplog.at_level("WARNING", logger="dpsign_fl"):
        torch.testing.assert_close(scattering_features(dataset).train_inputs, expected)
    assert "could not be read" in caplog.text


@pytest.mark.parametrize("planted", ["file-of-another-user", "link", "in-a-folder-others-can-write"])
def test_features_planted_in_the_cache_are_never_read(caplog, tmp_path, planted):
    dataset = images(4, seed=6)
    expected = scattering_features(dataset)
    (path,) = (cache_dir() / "features").glob("synthetic-*.pt")
    poisoned = {"train": torch.zeros_like(expected.train_inputs), "test": torch.zeros_like(expected.test_inputs)}
    if planted == "link":
        torch.save(poisoned, tmp_path / "poisoned.pt")
        path.unlink()
        path.symlink_to(tmp_path / "poisoned.pt")
    else:
        torch.save(poisoned, path)
    if planted == "file-of-another-user":
        if os.getuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(path, 65534, 65534)
    if planted == "in-a-folder-others-can-write":
        path.parent.chmod(0o777)

    with caplog.at_level("WARNING", logger="dpsign_fl"):
        torch.testing.assert_close(scattering_features(dataset).train_inputs, expected.train_inputs)

    reason = {"file-of-another-user": "is owned by uid 65534", "link": "is a symbolic link",
              "in-a-folder-others-can-write": "is writable by group or others (mode 777)"}[planted]
    assert reason in caplog.text


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DPSIGN_FL_CACHE")  # set by own_cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "dpsign-fl"
    monkeypatch.setenv("DPSIGN_FL_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_inputs_that_are_not_images_are_refused_naming_the_dataset():
    tables = Dataset(torch.zeros(4, 10), torch.zeros(4, dtype=torch.int64), torch.zeros(2, 10), torch.zeros(2, dtype=torch.int64), 2, "mushroom")
    with pytest.raises(ValueError, match="'mushroom'"):
        scattering_features(tables)


def test_without_kymatio_the_error_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_kymatio(name, *args, **kwargs):
        if name.startswith("kymatio"):
            raise ImportError("cannot import name 'sph_harm' from 'scipy.special'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_kymatio)
    with pytest.raises(ImportError, match=r"dpsign-fl\[scatternet\].*SciPy < 1.17.*sph_harm"):
        scattering_features(images(3))


@pytest.mark.parametrize("model", ["scatternet-linear", "scatternet-cnn"])
def test_the_run_dataset_of_a_scatternet_model_is_features_and_the_model_trains_per_example(model):
    settings = RunSettings(dataset="digits", model=model)
    assert input_features(model) == "scattering"
    dataset = load_run_dataset(settings)
    assert dataset.input_shape == (81, 2, 2)
    net = build_model(model, input_shape=dataset.input_shape, num_classes=10, seed=0)
    grads = per_sample_gradients(net, torch.nn.functional.cross_entropy, dataset.train_inputs[:4], dataset.train_targets[:4])
    assert grads.shape == (4, num_parameters(net)) and bool(torch.isfinite(grads).all())
    assert load_run_dataset(RunSettings(dataset="digits", model="mlp")).input_shape == (1, 8, 8)


def test_scatternet_models_normalise_each_example_on_its_own_without_parameters():
    net = build_model("scatternet-linear", input_shape=(81, 7, 7), num_classes=10, seed=0)
    assert num_parameters(net) == 81 * 49 * 10 + 10
    x = torch.randn(3, 81, 7, 7)
    alone = torch.cat([net(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(net(x), alone)  # no statistic across the batch
    torch.testing.assert_close(net(x * 5 + 2), net(x), rtol=1e-4, atol=1e-4)  # scale and shift of an example cancel
    with pytest.raises(ValueError, match="multiple of 27"):
        build_model("scatternet-cnn", input_shape=(1, 28, 28), num_classes=10)
