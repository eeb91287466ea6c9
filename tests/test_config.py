"""The one run-config parser: defaults, coercion, and one clear message per bad key."""

import pytest

from dpsign_fl.config import ConfigError, RunConfig, parse_run_config


def pyproject_defaults():
    import tomllib
    from pathlib import Path

    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_parse_and_cover_every_field():
    defaults = pyproject_defaults()
    config = parse_run_config(defaults)
    assert set(config.to_run_config()) == set(defaults)


def test_pyproject_defaults_equal_the_dataclass_defaults():
    # Two places hold defaults (pyproject for `flwr run`, RunConfig for library use): keep them equal.
    assert parse_run_config(pyproject_defaults()) == RunConfig()


def test_values_are_coerced_from_strings_as_the_cli_gives_them():
    config = parse_run_config({"num-server-rounds": "5", "target-epsilon": "3", "resume": "true", "seed": 7})
    assert config.num_server_rounds == 5 and config.target_epsilon == 3.0 and config.resume is True
    assert config.seed_value == 7


def test_empty_seed_means_secure_random():
    assert parse_run_config({"seed": ""}).seed_value is None


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("target-epsilon", 0, "target-epsilon must be in (0, inf)"),
        ("target-epsilon", -1.0, "target-epsilon"),
        ("target-delta", 1.0, "target-delta must be in (0, 1)"),
        ("target-delta", 0, "target-delta"),
        ("sample-rate", 1.3, "sample-rate must be in (0, 1], got 1.3"),
        ("sample-rate", 0.0, "sample-rate"),
        ("num-server-rounds", 0, "num-server-rounds must be in [1, inf)"),
        ("num-server-rounds", 2.5, "num-server-rounds must be an integer"),
        ("dataset", "imagenet", "dataset must be one of"),
        ("model", "resnet", "model must be one of"),
        ("partitioner", "random", "partitioner must be one of"),
        ("clipping", "per-layer", "clipping must be one of"),
        ("accountant", "moments", "accountant must be one of"),
        ("learning-rate", "fast", "learning-rate must be a number"),
        ("server-momentum", 1.0, "server-momentum"),
        ("seed", "abc", "seed must be an integer"),
        ("resume", "maybe", "resume must be true or false"),
        ("byzantine-fraction", 1.0, "byzantine-fraction"),
    ],
)
def test_a_bad_value_fails_with_a_message_naming_the_key(key, value, expected):
    with pytest.raises(ConfigError) as error:
        parse_run_config({key: value})
    assert expected in str(error.value)
    assert isinstance(error.value, ValueError)
