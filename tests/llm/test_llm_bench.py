"""The LoRA client-step benchmark runs and reports every step (not a timing test)."""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from dpsign_fl.bench.llm_step import STEPS, format_table, measure_llm_step  # noqa: E402


def test_the_lora_step_benchmark_times_every_step_against_the_non_private_one():
    result = measure_llm_step("tiny-gpt2", 4, repeats=1, memory=False)

    assert set(result["seconds"]) == set(STEPS) and result["ratio"]["non_private"] == (1.0, 1.0)
    assert 0 < result["adapter_coordinates"] < result["all_coordinates"]
    assert "release" in format_table([result])
