"""The one run description: defaults, key mapping, coercion, and one clear message per bad key."""

import math

import pytest

from dpsign_fl.experiments.hooks import ExperimentOptions
from dpsign_fl.settings import (
    SEED_LIMIT,
    ConfigError,
    FlowerOptions,
    RunSettings,
    from_mapping,
    keys,
    parse_run_config,
    run_config_of,
    specs,
)


def pyproject_defaults():
    import tomllib
    from pathlib import Path

    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def test_pyproject_lists_exactly_the_declared_keys():
    assert set(pyproject_defaults()) == keys(RunSettings, FlowerOptions, ExperimentOptions)


def test_pyproject_defaults_equal_the_declared_defaults():
    # pyproject (for `flwr run`) and the dataclasses (for library use) must not drift apart.
    assert parse_run_config(pyproject_defaults()) == (RunSettings(), FlowerOptions())
    assert from_mapping(ExperimentOptions, pyproject_defaults()) == ExperimentOptions()


def test_run_config_round_trips_through_the_key_mapping():
    settings, options = RunSettings(sample_rate=0.05, num_rounds=7), FlowerOptions(resume=True)
    assert parse_run_config(run_config_of(settings, options)) == (settings, options)


def test_total_rounds_is_num_rounds_in_python_and_num_server_rounds_in_the_run_config():
    assert specs(RunSettings)["num_rounds"].key == "num-server-rounds"
    assert parse_run_config({"num-server-rounds": 9})[0].num_rounds == 9


def test_values_are_coerced_from_strings_as_the_cli_gives_them():
    settings, options = parse_run_config({"num-server-rounds": "5", "target-epsilon": "3", "resume": "true", "model-seed": "7"})
    assert settings.num_rounds == 5 and settings.target_epsilon == 3.0 and options.resume is True
    assert settings.model_seed == 7


def test_large_integer_seeds_are_parsed_exactly():
    assert parse_run_config({"noise-seed": str(SEED_LIMIT - 1)})[0].noise_seed == SEED_LIMIT - 1


def test_python_construction_is_validated_and_names_the_python_field():
    with pytest.raises(ConfigError, match=r"sample_rate must be in \[0.0001, 1\], got 1.5"):
        RunSettings(sample_rate=1.5)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("target-epsilon", 0, "target-epsilon must be in [0.05, 100]"),
        ("target-epsilon", 1e30, "target-epsilon must be in [0.05, 100], got 1e+30"),
        ("target-epsilon", "nan", "target-epsilon must be a number"),
        ("target-delta", 1.0, "target-delta must be in"),
        ("target-delta", 0, "target-delta"),
        ("sample-rate", 1.3, "sample-rate must be in [0.0001, 1], got 1.3"),
        ("sample-rate", 1e-300, "sample-rate"),
        ("num-server-rounds", 0, "num-server-rounds must be in [1, 1e+06]"),
        ("num-server-rounds", 2.5, "num-server-rounds must be an integer"),
        ("num-server-rounds", math.inf, "num-server-rounds must be an integer"),
        ("num-server-rounds", "inf", "num-server-rounds must be an integer"),
        ("dataset", "imagenet", "dataset must be one of"),
        ("dataset", 3, "dataset must be a string"),
        ("data-dir", None, "data-dir must be a string"),
        ("model", "resnet", "model must be one of"),
        ("model-width", 100, "model-width must be a multiple of 16, got 100"),
        ("model-width", 8, "model-width must be in [16, 512], got 8"),
        ("model-depth", 0, "model-depth must be in [1, 12], got 0"),
        ("model-previous-characters", -1, "model-previous-characters must be in [0, 16]"),
        ("partitioner", "random", "partitioner must be one of"),
        ("clipping", "per-layer", "clipping must be one of"),
        ("accountant", "moments", "accountant must be one of"),
        ("learning-rate", "fast", "learning-rate must be a number"),
        ("server-momentum", 1.0, "server-momentum"),
        ("model-seed", -1, "model-seed must be in [0, 9.22337e+18)"),
        ("noise-seed", 2**70, "noise-seed must be in [0, 9.22337e+18)"),
        ("data-seed", "abc", "data-seed must be an integer"),
        ("resume", "maybe", "resume must be true or false"),
        ("reproducible-noise", 1, "reproducible-noise must be true or false"),
        ("fraction-train", 0.0, "fraction-train must be in (0, 1]"),
        ("participation", 0.0, "participation must be in (0, 1], got 0.0"),
        ("participation", 1.5, "participation must be in (0, 1], got 1.5"),
        ("participation", "half", "participation must be a number, got 'half'"),
        ("participation-margin", -0.5, "participation-margin must be in [0, 10], got -0.5"),
        ("participation-margin", float("inf"), "participation-margin must be in [0, 10], got inf"),
        ("participation-margin", float("nan"), "participation-margin must be a number, got nan"),
        ("client-schedule", "fair", "client-schedule must be one of ('random', 'balanced'), got 'fair'"),
    ],
)
def test_a_bad_value_fails_with_a_message_naming_the_key(key, value, expected):
    with pytest.raises(ConfigError) as error:
        parse_run_config({key: value})
    assert expected in str(error.value)
    assert isinstance(error.value, ValueError)


def test_unknown_keys_are_named_when_the_caller_asks_for_strictness():
    with pytest.raises(ConfigError, match="unknown setting --sample-rte"):
        from_mapping(RunSettings, {"sample-rte": 0.1}, ignore_unknown=False, style="option")


def test_experiment_only_settings_are_listed_when_changed():
    assert ExperimentOptions().changed() == {}
    assert ExperimentOptions(byzantine_fraction=0.2, gradient_noise="levy").changed() == {
        "byzantine-fraction": 0.2,
        "gradient-noise": "levy",
    }
    with pytest.raises(ConfigError, match="byzantine-fraction"):
        from_mapping(ExperimentOptions, {"byzantine-fraction": 1.0})


def test_the_run_config_checker_names_a_misspelt_key_and_the_closest_known_one(capsys):
    from dpsign_fl.settings import main

    assert main(["sample-rte=0.1 dataset='mnist'"]) == 2
    assert "unknown run-config key 'sample-rte'; did you mean 'sample-rate'?" in capsys.readouterr().err


def test_the_run_config_checker_names_a_bad_value_and_accepts_good_ones(capsys):
    from dpsign_fl.settings import main

    assert main(["sample-rate=1.5"]) == 2
    assert "sample-rate must be in [0.0001, 1], got 1.5" in capsys.readouterr().err
    assert main(["num-server-rounds=5 dataset='mnist'"]) == 0
    assert "num-server-rounds = 5" in capsys.readouterr().out


def test_a_dataset_run_with_the_digits_defaults_gets_a_warning_with_measured_settings(capsys):
    from dpsign_fl.settings import main

    assert main(["dataset='mnist'"]) == 0
    err = capsys.readouterr().err
    assert "warning: dataset 'mnist' runs with sample-rate=0.3 and num-server-rounds=60" in err
    assert "scatternet-linear" in err
    assert main(["dataset='mnist' sample-rate=0.05 num-server-rounds=1000"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([""]) == 0  # digits: the defaults are its own
    assert "warning" not in capsys.readouterr().err


def fresh_interpreter_lines(code: str) -> list[str]:
    """What ``code`` prints, line by line, run in a fresh interpreter (nothing imported by other tests)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")


def test_importing_the_settings_loads_neither_torch_nor_the_experiment_hooks():
    # The settings checker answers in seconds; torch takes most of them. Negative control: the
    # release module does load torch, so the check can see an import.
    lines = fresh_interpreter_lines(
        "import sys, dpsign_fl.settings; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('dpsign_fl.experiments'))); "
        "import dpsign_fl.release; print('torch' in sys.modules)"
    )

    assert lines[0] == "[]"
    assert lines[1] == "True"


def test_participation_below_fraction_train_gets_a_warning_and_an_equal_one_none(capsys):
    from dpsign_fl.settings import main

    assert main(["participation=0.1"]) == 0  # fraction-train 1.0: every client asked every round
    assert "warning: participation=0.1 is below fraction-train=1" in capsys.readouterr().err
    assert main(["participation=0.25 fraction-train=0.25"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_margin_below_the_default_with_random_sampling_gets_a_warning_and_with_the_balanced_schedule_none(capsys):
    from dpsign_fl.settings import main

    assert main(["participation=0.25 fraction-train=0.25 participation-margin=0"]) == 0
    assert "warning: participation-margin=0 is below the default 3 with client-schedule='random'" in capsys.readouterr().err
    assert main(["participation=0.25 fraction-train=0.25 participation-margin=0 client-schedule='balanced'"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["participation=0.25 fraction-train=0.25 participation-margin=3"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["participation-margin=0"]) == 0  # participation 1: every round planned, the margin is not used
    assert "warning" not in capsys.readouterr().err


def test_client_momentum_with_the_robust_vote_gets_a_warning_and_with_the_plain_majority_none(capsys):
    from dpsign_fl.settings import main

    assert main(["client-momentum=0.7"]) == 0  # the robust vote is the default
    assert "warning: client-momentum=0.7 with vote='robust'" in capsys.readouterr().err
    for quiet in ("client-momentum=0.7 vote='majority'", "client-momentum=0", ""):
        assert main([quiet]) == 0
        assert "warning" not in capsys.readouterr().err, quiet


def test_the_shakespeare_warning_names_the_recipes_measured_settings(capsys):
    from dpsign_fl.settings import main

    assert main(["dataset='shakespeare'"]) == 0
    err = capsys.readouterr().err
    assert "warning: dataset 'shakespeare' runs with sample-rate=0.3" in err
    assert "learning-rate=0.01" in err and "pretrain-steps=900" in err


def test_the_release_path_does_not_import_the_experiment_hooks():
    # Experiments reach a round only through the seam the app installs (dpsign_fl.experiments.hooks).
    lines = fresh_interpreter_lines(
        "import sys, dpsign_fl.release, dpsign_fl.rounds, dpsign_fl.flower.client, dpsign_fl.flower.server; "
        "print(sorted(m for m in sys.modules if m.startswith('dpsign_fl.experiments'))); "
        "import dpsign_fl.flower.inprocess; print('dpsign_fl.experiments.hooks' in sys.modules)"
    )

    assert lines[0] == "[]"
    assert lines[1] == "True"  # negative control: the in-process app installs the seam, and the probe sees it


def test_automatic_steps_on_shakespeare_get_a_warning_and_a_learning_rate_or_another_dataset_none(capsys):
    from dpsign_fl.settings import main

    tuned = "dataset='shakespeare' sample-rate=0.05 num-server-rounds=1000"
    assert main([tuned]) == 0  # learning-rate 0, the app's default: automatic steps
    err = capsys.readouterr().err
    assert "warning: learning-rate=0 (automatic steps) on dataset 'shakespeare'" in err
    assert "2.4%" in err and "learning-rate=0.01" in err  # what diverged, and what was measured instead
    assert err.count("warning") == 1
    for quiet in (f"{tuned} learning-rate=0.01", "dataset='mnist' sample-rate=0.05 num-server-rounds=1000"):
        assert main([quiet]) == 0
        assert "warning" not in capsys.readouterr().err, quiet
    assert main(["dataset='shakespeare'"]) == 0  # with the digits' defaults too: two warnings, the settings once
    err = capsys.readouterr().err
    assert err.count("warning") == 2 and err.count("learning-rate=0.01") == 1
