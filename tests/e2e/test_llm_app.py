"""LoRA fine-tuning of a tiny GPT-2 through the drop-in, run with the real `flwr run`.

tests/llm_app is a small user app: ``dp_sign_train(msg, context, model, train_data)`` with a
PEFT model in its ClientApp, ``SignMajorityVote`` started from ``adapter_arrays(model)`` in its
ServerApp, which saves the final adapters with ``save_adapters``. 3 SuperNodes, 2 rounds,
offline (the model is built from its config, the text generated). The SuperLink (and so the
simulation and its ClientApps) gets this checkout first on PYTHONPATH: the test exercises this
repository's dpsign_fl even where an installed copy comes from elsewhere.
"""

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from .harness import REPO, LocalSimulation  # noqa: E402

APP = REPO / "tests" / "llm_app"
ROUNDS = 2
SUPERNODES = 3
TARGET_EPSILON = 8.0  # the app's run config


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm-out")
    with LocalSimulation(tmp_path_factory.mktemp("flwr-home"), extra_env={"PYTHONPATH": str(REPO)}) as simulation:
        completed = simulation.run(f"out-dir='{out}'", num_supernodes=SUPERNODES, app=APP,
                                   done=lambda: (out / "metrics.json").exists())
    log = completed.stdout + completed.stderr
    assert (out / "metrics.json").exists(), log[-6000:]
    return out, json.loads((out / "metrics.json").read_text()), log


def test_every_supernode_votes_with_one_bit_per_adapter_coordinate_within_the_target_epsilon(llm_run):
    _, metrics, log = llm_run
    adapters = metrics["adapter-coordinates"]
    rounds = [metrics["rounds"][str(r)] for r in range(1, ROUNDS + 1)]

    assert [r["voters"] for r in rounds] == [SUPERNODES] * ROUNDS, log[-6000:]
    assert all(r["payload-bytes"] == math.ceil(adapters / 8) for r in rounds)
    assert all(r["uplink-bytes"] == SUPERNODES * math.ceil(adapters / 8) for r in rounds)
    epsilons = [r["epsilon"] for r in rounds]
    assert 0 < epsilons[0] < epsilons[1] <= TARGET_EPSILON


def test_the_downlink_carries_the_adapters_then_the_votes_never_the_frozen_base_weights(llm_run):
    _, metrics, _ = llm_run
    adapters, frozen = metrics["adapter-coordinates"], metrics["all-coordinates"] - metrics["adapter-coordinates"]
    first, second = metrics["rounds"]["1"], metrics["rounds"]["2"]

    assert SUPERNODES * 4 * adapters <= first["downlink-bytes"] < SUPERNODES * (4 * adapters + 4096)
    assert first["downlink-bytes"] < 4 * frozen
    assert second["downlink-bytes"] < SUPERNODES * (adapters // 4 + 4096)  # a vote: 1-1.6 bits per coordinate


def test_the_saved_adapters_load_with_peft_and_were_trained(llm_run):
    import sys

    from peft import PeftModel

    out, _, _ = llm_run
    sys.path.insert(0, str(APP))
    try:
        from llmapp.task import build_base_model, build_model
    finally:
        sys.path.remove(str(APP))
    initial = build_model()
    loaded = PeftModel.from_pretrained(build_base_model(), out / "adapters")

    trained = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert trained.keys() == {n for n, p in initial.named_parameters() if p.requires_grad}
    assert all(float(p.abs().max()) > 0 for n, p in trained.items() if "lora_B" in n)  # PEFT starts lora_B at 0
