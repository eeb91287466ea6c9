"""dp_sign_train with a PEFT causal LM, SignMajorityVote on its adapters, and the adapters saved for PEFT.

Driven in process: the strategy's real start() against an in-process Grid
whose nodes call dp_sign_train as a user's ClientApp would.
"""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict  # noqa: E402
from peft import PeftModel  # noqa: E402

from dpsign_fl import SignMajorityVote  # noqa: E402
from dpsign_fl.flower import adapter_arrays, dp_sign_train, save_adapters  # noqa: E402
from dpsign_fl.flower.inprocess import InProcessGrid, server_task_identity  # noqa: E402
from dpsign_fl.flower.records import (  # noqa: E402
    INVALID_INSTRUCTION_CODE,
    LEDGER_STATE_KEY,
    NODE_ERROR_CODE,
    NODE_ERROR_REASON,
    NPY_HEADER_BYTES,
    load_ledger,
)

from .tiny import VOCAB_SIZE, generated_chunks, tiny_gpt2, tiny_gpt2_base, tiny_llama  # noqa: E402

RUN_CONFIG = {"target-epsilon": 8.0, "target-delta": 1e-5, "sample-rate": 0.5, "clip-norm": 1.0, "num-server-rounds": 2}
NODES = 3


@pytest.fixture(autouse=True)
def server_identity():
    with server_task_identity():
        yield


def node_handler(build=tiny_gpt2, data=None, **options):
    def handler(message, context):
        partition = int(context.node_config["partition-id"])
        train_data = data if data is not None else {"input_ids": generated_chunks(seed=partition, count=12)}
        return dp_sign_train(message, context, build(), train_data, simulation=True, **options)

    return handler


def run(build=tiny_gpt2, rounds=2, initial=None, **strategy_options):
    grid = InProcessGrid(RUN_CONFIG, NODES, handler=node_handler(build))
    strategy = SignMajorityVote(learning_rate=0.01, min_available_nodes=NODES, **strategy_options)
    initial = adapter_arrays(build()) if initial is None else initial
    return grid, initial, strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_lora_rounds_move_only_the_adapters_with_one_bit_per_adapter_coordinate_each_way(build):
    model = build()
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    everything = sum(p.numel() for p in model.parameters())

    grid, initial, result = run(build)

    metrics = [result.train_metrics_clientapp[r] for r in (1, 2)]
    assert [m["voters"] for m in metrics] == [NODES, NODES]
    assert all(m["payload-bytes"] == (adapters + 7) // 8 for m in metrics)
    assert all(m["uplink-bytes"] == NODES * ((adapters + 7) // 8) for m in metrics)
    # Round 1 sends the adapters (float32, one .npy header per array), never the frozen base weights.
    assert metrics[0]["downlink-bytes"] <= NODES * (4 * adapters + NPY_HEADER_BYTES * len(initial))
    assert metrics[0]["downlink-bytes"] < 4 * (everything - adapters)
    assert metrics[1]["downlink-bytes"] <= NODES * (adapters // 8 + 1024)  # the votes only
    assert all(0 < m["epsilon"] <= RUN_CONFIG["target-epsilon"] for m in metrics)
    assert list(result.arrays.keys()) == list(initial.keys())
    assert all("lora_" in name for name in initial.keys())
    assert any(not np.array_equal(result.arrays[n].numpy(), initial[n].numpy()) for n in initial.keys())
    for context in grid.contexts.values():
        assert load_ledger(context.state, accountant="pld").num_releases == 2


def test_saved_adapters_load_with_peft_from_pretrained_as_the_final_arrays(tmp_path):
    _, _, result = run(tiny_gpt2)
    server_model = tiny_gpt2()

    folder = save_adapters(server_model, result.arrays, tmp_path / "adapters")
    loaded = PeftModel.from_pretrained(tiny_gpt2_base(), folder)

    final = {name: array.numpy() for name, array in result.arrays.items()}
    trained = {name: p.detach().numpy() for name, p in loaded.named_parameters() if "lora_" in name}
    assert trained.keys() == final.keys()
    for name, value in final.items():
        np.testing.assert_array_equal(trained[name], value)
    base = tiny_gpt2_base().state_dict()
    kept = {name.replace(".base_layer", ""): value for name, value in loaded.get_base_model().state_dict().items()
            if "lora_" not in name}
    assert kept.keys() == base.keys() and all(torch.equal(kept[name], base[name]) for name in base)


def test_a_server_that_sends_the_frozen_base_weights_is_refused_naming_adapter_arrays():
    model = tiny_gpt2()
    everything = ArrayRecord(model.state_dict())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]

    with pytest.raises(RuntimeError, match=r"error 4604: .*send the adapters only, initial_arrays=adapter_arrays"):
        run(tiny_gpt2, initial=everything, trainable=trainable, max_failed_rounds=1)


def one_reply(model, data, **options):
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 1},
                      state=RecordDict(), run_config=dict(RUN_CONFIG))
    strategy = SignMajorityVote(min_available_nodes=1, min_train_nodes=1)
    grid = InProcessGrid(RUN_CONFIG, 1)
    message = list(strategy.configure_train(1, adapter_arrays(model), ConfigRecord(), grid))[0]
    return context, dp_sign_train(message, context, model, data, simulation=True, **options)


def test_a_model_the_per_example_pass_cannot_handle_is_refused_before_any_release_naming_the_module():
    context, reply = one_reply(tiny_gpt2(target_modules=("wte", "c_attn")), {"input_ids": generated_chunks(0, 4)})

    assert reply.has_error() and reply.error.code == INVALID_INSTRUCTION_CODE
    assert "cannot release this model" in reply.error.reason and "lora_embedding_A" in reply.error.reason
    assert LEDGER_STATE_KEY not in context.state


def test_keys_or_a_loss_for_a_causal_lm_are_refused():
    for options in ({"keys": ("input_ids", "labels")}, {"loss_fn": torch.nn.functional.mse_loss}):
        _, reply = one_reply(tiny_gpt2(), {"input_ids": generated_chunks(0, 4)}, **options)
        assert reply.has_error() and reply.error.code == INVALID_INSTRUCTION_CODE
        assert "own next-token loss" in reply.error.reason


def test_token_ids_outside_the_vocabulary_get_the_fixed_reply_and_no_release(caplog):
    chunks = generated_chunks(0, 4)
    chunks[2, 5] = 500
    context, reply = one_reply(tiny_gpt2(), {"input_ids": chunks})

    assert reply.has_error() and (reply.error.code, reply.error.reason) == (NODE_ERROR_CODE, NODE_ERROR_REASON)
    assert f"token ids must be in [0, {VOCAB_SIZE})" in caplog.text
    assert LEDGER_STATE_KEY not in context.state


def test_adapter_arrays_of_a_model_without_trainable_parameters_are_refused():
    with pytest.raises(ValueError, match="must have trainable parameters"):
        adapter_arrays(tiny_gpt2().merge_and_unload().requires_grad_(False))
