"""DP-SIGN for an existing Flower app: one call in its ``@app.train()``.

::

    from dpsign_fl.flower import dp_sign_train

    @app.train()
    def train(msg: Message, context: Context):
        model = Net()
        trainloader, _ = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
        return dp_sign_train(msg, context, model, trainloader, keys=("img", "label"))

and, in the ServerApp, ``SignMajorityVote(...)`` instead of ``FedAvg(...)``. The
call does the whole client step of :mod:`dpsign_fl.flower.client`: it receives
the model (or the votes since the model it holds), keeps the privacy ledger,
plans the noise once per run, makes one DP-SIGN release from the user's own
model and data, and replies with the packed signs and the epsilon spent, or
with the library's refusal. Nothing else of the user's data leaves the device.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from flwr.app import Context, Message
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ..data.loading import check_examples
from ..llm import is_causal_lm
from ..settings import ConfigError, RunSettings, specs
from .client import BadInstruction, guarded_reply, instruction_checks, receive_model, release_with_model
from .llm import causal_lm_release
from .node import NodeConfig, parse_node_config, running_in_simulation

PRIVACY_KEYS = ("target-epsilon", "target-delta", "sample-rate", "clip-norm", "num-server-rounds")
"""The run-config keys dp_sign_train reads when they are not given as arguments (required)."""

OPTIONAL_KEYS = {
    "clipping": RunSettings.clipping, "accountant": RunSettings.accountant, "participation": RunSettings.participation,
    "participation-margin": RunSettings.participation_margin,
}
"""Run-config keys dp_sign_train also reads, with their defaults."""


def dp_sign_train(
    message: Message,
    context: Context,
    model: nn.Module,
    train_data,
    *,
    keys: tuple[str, str] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    simulation: bool | None = None,
    **privacy: Any,
) -> Message:
    """Make this node's DP-SIGN release with the user's model and data; return the reply Message.

    Privacy: one Sampled Gaussian Mechanism release (each example sampled with
    probability ``sample-rate``, per-example gradients clipped to ``clip-norm``
    over all trainable parameters, summed, Gaussian noise, sign), recorded in
    this node's ledger before the reply leaves; refused once the ledger would
    exceed the budget (run config's, never above the node's cap: ``max-epsilon``,
    on a deployed node that sets none epsilon 8 at delta 1e-5).

    Args:
        message: the train instruction ``SignMajorityVote`` sent.
        context: the node's Flower context.
        model: a fresh instance of the user's model (its weights are replaced by
            the global model, buffers too). BatchNorm layers run in eval mode,
            with the statistics the server sent: per-example gradients need the
            examples of a batch to be independent. Or a ``transformers``
            causal LM wrapped by ``peft.get_peft_model``: then only its
            trainable parameters (the adapters) are received, released and
            voted on, one example is one token sequence, and the loss is its
            own next-token loss (:mod:`dpsign_fl.flower.llm`).
        train_data: a ``torch.utils.data.Dataset``, a ``DataLoader`` (its
            dataset is used; Poisson sampling replaces its batching), or an
            ``(inputs, targets)`` pair of tensors. For a causal LM: tokenised
            sequences, ``input_ids`` and optionally ``attention_mask``
            (:func:`dpsign_fl.llm.token_examples` lists the forms).
        keys: for datasets whose samples are dicts, the input and target keys,
            e.g. ``("img", "label")``. Not for a causal LM.
        loss_fn: ``loss_fn(outputs, targets)``, the MEAN of per-example losses.
            Not for a causal LM.
        simulation: whether the node is simulated; None = detect it.
        **privacy: ``target_epsilon``, ``target_delta``, ``sample_rate``,
            ``clip_norm``, ``num_rounds``, ``clipping``, ``accountant``,
            ``participation``; each
            one not given is read from the run config (:data:`PRIVACY_KEYS`,
            :data:`OPTIONAL_KEYS`). Other run-config keys are left alone.

    Returns:
        The reply: packed signs and ``epsilon``, an error reply (4601 budget
        exhausted, 4602 a release that failed after sampling, 4603 the server
        must send the model, 4604 a bad privacy setting or model from the
        server, named in the reason; 4605 anything else, e.g. data that is not
        finite or targets outside the model's outputs: the reason is fixed and
        the detail is only in the node's log, since it may describe the data),
        or the acknowledgement of a sync-only instruction.
    """
    return guarded_reply(
        message, context, lambda: _train(message, context, model, train_data, keys, loss_fn, simulation, privacy)
    )


def _train(message, context, model, train_data, keys, loss_fn, simulation, privacy) -> Message:
    with instruction_checks():
        settings = privacy_settings(context.run_config, privacy)
    node = _node_config(context.node_config)
    simulated = running_in_simulation() if simulation is None else simulation
    causal_lm = is_causal_lm(model)
    if causal_lm and (keys is not None or loss_fn is not F.cross_entropy):
        raise BadInstruction("dp_sign_train trains a causal LM on its own next-token loss: pass neither keys nor loss_fn")
    received = receive_model(message, context, node, simulated, model=model)
    if isinstance(received, Message):
        return received
    # The app chooses its own examples; what the node config says about them keys the ledger.
    identity = {"partition-id": node.partition_id, "num-partitions": node.num_partitions, "data-dir": node.data_dir}
    if causal_lm:
        return causal_lm_release(message, context, received, model, train_data, settings, node, simulated, identity=identity)
    inputs, targets = examples(train_data, keys)
    with torch.no_grad():
        outputs = model(inputs[:1]) if inputs.shape[0] else None
    num_classes = int(outputs.shape[-1]) if outputs is not None and outputs.ndim == 2 else None
    check_examples(inputs, targets, num_classes if not targets.is_floating_point() else None, name="train_data")
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return release_with_model(
        message, context, received, model, inputs, targets, settings, node, simulated, identity=identity, loss_fn=loss_fn
    )


def privacy_settings(run_config, given: dict[str, Any]) -> RunSettings:
    """The privacy settings of a drop-in release: arguments first, then the documented run-config keys.

    Raises:
        ConfigError: naming a missing key (and how to give it) or a bad value.
    """
    by_name = specs(RunSettings)
    names = {spec.key: name for name, spec in by_name.items() if spec.key in PRIVACY_KEYS + tuple(OPTIONAL_KEYS)}
    unknown = set(given) - set(names.values())
    if unknown:
        raise ConfigError(f"dp_sign_train got unknown privacy settings {sorted(unknown)}")
    values = {}
    for key in PRIVACY_KEYS + tuple(OPTIONAL_KEYS):
        name = names[key]
        if name in given:
            values[name] = by_name[name].coerce(given[name], name)
        elif key in run_config:
            values[name] = by_name[name].coerce(run_config[key], key)
        elif key in OPTIONAL_KEYS:
            values[name] = OPTIONAL_KEYS[key]
        else:
            raise ConfigError(
                f"dp_sign_train needs {key}: add it to [tool.flwr.app.config] in pyproject.toml "
                f"or pass {name}=... to dp_sign_train"
            )
    return RunSettings(**values)


def examples(train_data, keys: tuple[str, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The user's training set as two tensors ``(inputs [N, ...], targets [N])``.

    Raises:
        TypeError: for data of another kind, or dict samples without ``keys``.
    """
    if isinstance(train_data, tuple) and len(train_data) == 2 and all(isinstance(t, torch.Tensor) for t in train_data):
        return train_data
    dataset = train_data.dataset if isinstance(train_data, DataLoader) else train_data
    if not isinstance(dataset, Dataset) and not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"train_data must be a Dataset, a DataLoader or an (inputs, targets) pair of tensors, got {type(train_data).__name__}"
        )
    samples = [dataset[i] for i in range(len(dataset))]
    if samples and isinstance(samples[0], dict):
        if keys is None:
            raise TypeError(f"train_data's samples are dicts with keys {sorted(samples[0])}: pass keys=(input_key, target_key)")
        pairs = [(sample[keys[0]], sample[keys[1]]) for sample in samples]
    else:
        pairs = [(sample[0], sample[1]) for sample in samples]
    if not pairs:
        return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    inputs = torch.stack([torch.as_tensor(x) for x, _ in pairs])
    targets = torch.stack([torch.as_tensor(y) for _, y in pairs])
    return (inputs if inputs.is_floating_point() else inputs.float()), targets


def _node_config(node_config) -> NodeConfig:
    """The node's dpsign-fl settings; the app's own node-config keys are left alone."""
    ours = {key: value for key, value in node_config.items() if key in _NODE_KEYS}
    return parse_node_config(ours, require_data=False)


_NODE_KEYS = {spec.key for spec in specs(NodeConfig).values()}
