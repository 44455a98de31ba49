"""Where a model runs: the execution device of its inputs and of each decoder layer.

`model.device` is the first parameter's device, which names the wrong device (or `meta`) when accelerate
spreads a model over devices or offloads weights to the CPU or disk (`device_map`): offloaded weights sit on
`meta` outside their own forward. accelerate's hooks know where each module really executes.
"""

import itertools

import torch
from torch import nn
from transformers import PreTrainedModel


def execution_device(module: nn.Module) -> torch.device | None:
    """The device `module` computes on: its accelerate hook's execution device, else the device of its first
    parameter or buffer that is not a `meta` placeholder; None if neither says."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return None


def input_device(model: PreTrainedModel) -> torch.device:
    """Where the model's input ids go: the execution device of its input embeddings (CPU if none says)."""
    return execution_device(model.get_input_embeddings()) or execution_device(model) or torch.device("cpu")


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList | None:
    """The model's list of decoder layers (the first module list with one entry per hidden layer), if found."""
    count = model.config.get_text_config(decoder=True).num_hidden_layers
    return next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == count), None)


def layer_devices(model: PreTrainedModel) -> list[torch.device]:
    """Each decoder layer's execution device, where its attention reads and writes the cache."""
    fallback = input_device(model)
    layers = decoder_layers(model)
    if layers is None:
        return [fallback] * model.config.get_text_config(decoder=True).num_hidden_layers
    return [execution_device(layer) or fallback for layer in layers]
