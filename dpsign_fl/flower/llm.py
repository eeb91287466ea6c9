"""LoRA fine-tuning of a Hugging Face causal LM with DP-SIGN: the client step and the server's helpers.

Client: ``dp_sign_train(msg, context, model, train_data)`` with ``model`` a
``transformers`` causal LM wrapped by ``peft.get_peft_model`` and
``train_data`` tokenised sequences takes :func:`causal_lm_release` (the
drop-in recognises the model, :func:`dpsign_fl.llm.is_causal_lm`). Server::

    model = get_peft_model(base_model, LoraConfig(...))
    strategy = SignMajorityVote(...)
    result = strategy.start(grid=grid, initial_arrays=adapter_arrays(model), num_rounds=...)
    save_adapters(model, result.arrays, "adapters")  # PeftModel.from_pretrained(base_model, "adapters")

Only the adapters travel: the server's arrays are the trainable parameters
(the downlink sends them, or the votes), the reply one sign per adapter
coordinate, ``ceil(d_adapters / 8)`` bytes. The frozen base weights stay
where they are: every node and the server must build the same base model
(the same checkpoint, or the same seed for a model made from a config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord, Context, Message
from torch import nn

from ..llm import UnsupportedModel, causal_lm_loss, check_per_example_support, packed_calls, token_examples
from ..vote.model_sync import ModelReplica
from ..settings import RunSettings
from .client import BadInstruction, release_with_model
from .node import NodeConfig
from .records import load_arrays_into_model, model_to_arrays


def causal_lm_release(
    message: Message,
    context: Context,
    replica: ModelReplica,
    model: nn.Module,
    train_data,
    settings: RunSettings,
    node: NodeConfig,
    simulated: bool,
    *,
    identity: Mapping[str, Any],
) -> Message:
    """One DP-SIGN release of a causal LM's trainable parameters (the adapters) at the replica's model.

    Privacy: one example is one token sequence. Its gradient is that of its
    own next-token loss, mean over its tokens (:func:`dpsign_fl.llm.causal_lm_loss`),
    with respect to the trainable parameters only, clipped to ``clip-norm``
    over all of them together; the rest is :func:`dpsign_fl.flower.client.release_with_model`
    (sampling, noise, sign, the ledger). The model runs in training mode
    (its dropout as configured).

    Raises:
        BadInstruction: the server sent arrays other than the trainable
            parameters (the frozen base weights are never sent), or the
            model is one the per-example pass cannot handle
            (:func:`dpsign_fl.llm.check_per_example_support`; the reason
            names modules of the app's model, never data). Both before any
            example is read.
        ValueError: from :func:`dpsign_fl.llm.token_examples` (the node's data:
            a fixed reply, the detail in the node's log).
    """
    frozen = [name for name in replica.arrays if name not in replica.trainable]
    if frozen:
        raise BadInstruction(
            f"the server sent {len(frozen)} arrays that the votes do not move ({frozen[:3]}...): for a causal LM "
            "send the adapters only, initial_arrays=adapter_arrays(model)"
        )
    model.train()
    with packed_calls(model):
        try:
            check_per_example_support(model)
        except UnsupportedModel as error:
            raise BadInstruction(f"dp_sign_train cannot release this model: {error}") from None
        config = getattr(model, "config", None)
        inputs, labels = token_examples(
            train_data, vocab_size=model.get_input_embeddings().num_embeddings,
            max_length=getattr(config, "max_position_embeddings", None),
        )
        return release_with_model(
            message, context, replica, model, inputs, labels, settings, node, simulated, identity=identity,
            loss_fn=causal_lm_loss,
        )


def adapter_arrays(model: nn.Module) -> ArrayRecord:
    """The trainable parameters of a PEFT model (its adapters) as the server's initial arrays.

    Pass them to ``SignMajorityVote.start(initial_arrays=...)``: the votes
    cover exactly these arrays, in ``parameters()`` order, which is the order
    ``dp_sign_train`` releases in. The frozen base weights are left out.

    Raises:
        ValueError: if the model has no trainable parameter.
    """
    arrays = model_to_arrays(model)
    if not arrays:
        raise ValueError("model must have trainable parameters (wrap it with peft.get_peft_model), got none")
    return arrays


def save_adapters(model: nn.Module, arrays: ArrayRecord, folder: str | Path) -> Path:
    """Write ``arrays`` (e.g. ``Result.arrays``) into ``model``'s adapters and save them with PEFT's ``save_pretrained``.

    ``peft.PeftModel.from_pretrained(base_model, folder)`` loads them again.

    Returns:
        The folder.

    Raises:
        TypeError: if ``model`` has no ``save_pretrained`` (not a PEFT model).
        ValueError: if the arrays are not exactly the model's trainable parameters.
    """
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(f"model must be a PEFT model (with save_pretrained), got {type(model).__name__}")
    load_arrays_into_model(model, arrays)
    folder = Path(folder)
    model.save_pretrained(folder)
    return folder
