"""The DynSDPB loss inside the model's forward pass, like TRL's fused LM head for plain SFT.

`add_distillation_head(model)` lets `model(..., dynsdpb=DistillationInputs(...))` run the backbone and compute the loss
terms of the response tokens from the final hidden states (`losses.FusedDistillationLoss`), instead of returning
logits. Doing it inside the forward, rather than on what the forward returns, matters for users' setups:

- it runs under the same autocast as the rest of the model (`bf16=True` / `fp16=True`), whatever the weights' dtype;
- mixed precision converts a model's outputs to float32, which for full logits or all hidden states is gigabytes;
- DDP sees the output layer used inside its forward, and `device_map` splits are bridged (hidden states are moved to
  the output layer's device);
- FSDP and DeepSpeed ZeRO-3 hold the whole output layer only during the forward (outside it, each process has a
  shard): every use of its weight, the teacher logits to cache included, happens here.

Without `dynsdpb` the forward is the one the model had before (TRL's fused LM head, generation, evaluation).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from .losses import default_chunk_size, fused_distillation_loss, project_in_chunks

try:
    from torch.distributed.tensor import DTensor  # FSDP2's sharded parameters
except ImportError:  # a torch built without distributed support
    DTensor = ()


@dataclass
class DistillationInputs:
    """What the forward needs besides the batch. Row order is the batch's; token order is row-major.

    Attributes:
        distilled_rows: `[B]` bool, the rows distilled towards a teacher.
        teacher: `[M, H]` final hidden states or `[M, V]` logits of those rows' response tokens, one step old.
        teacher_is_hidden: which of the two `teacher` is.
        kl_weight, temperature: `[M]`, each distilled token's `alpha_i` and `T_i`.
        returned_rows: `[B]` bool, the rows whose response hidden states the output carries (to be cached).
        chunk_size: tokens per chunk of the loss (None: about 32 MB of float32 logits per chunk).
        returned_logits_dtype: if set, the output also carries those rows' logits in this dtype (a trained output
            layer's teacher).
    """

    distilled_rows: Tensor
    teacher: Tensor
    teacher_is_hidden: bool
    kl_weight: Tensor
    temperature: Tensor
    returned_rows: Tensor
    chunk_size: int | None = None
    returned_logits_dtype: torch.dtype | None = None


@dataclass
class DistillationOutput(ModelOutput):
    """Per response token (packed, row-major, `N` in all) and per distilled token (`M`), float32 unless noted.

    Attributes:
        log_probs: `[N]` gold-token log-probabilities (the cross-entropy is `-log_probs.sum()`).
        distill: `[M]` `alpha_i T_i^2 KL_ij`, in the order of `DistillationInputs.teacher`.
        entropy: `[N]` entropy of the predicted distribution (no gradient).
        is_top1: `[N]` bool, whether the gold token is the argmax.
        returned_hidden: `[K, H]` detached final hidden states of the `returned_rows`' response tokens.
        returned_logits: `[K, V]` their logits, in `returned_logits_dtype` (None unless asked for).
    """

    log_probs: Tensor | None = None
    distill: Tensor | None = None
    entropy: Tensor | None = None
    is_top1: Tensor | None = None
    returned_hidden: Tensor | None = None
    returned_logits: Tensor | None = None


def output_layer(model: nn.Module) -> nn.Module:
    """The output layer of a (PEFT-wrapped) causal LM, as the forward pass sees it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings()


def output_layer_sizes(model: nn.Module) -> tuple[int, int]:
    """`(vocabulary, hidden size)` of the linear output layer, read from the module: under FSDP and ZeRO-3 its weight
    is a shard outside the forward."""
    head = output_layer(model)
    linear = getattr(head, "original_module", head)  # PEFT's `ModulesToSaveWrapper` keeps the layer's own copy
    return linear.out_features, linear.in_features


def add_distillation_head(model: nn.Module) -> None:
    """Patch `model.forward` (the base model, under any PEFT wrapper) to accept `dynsdpb=DistillationInputs(...)`."""
    previous_forward = model.forward

    @functools.wraps(type(model).forward)  # keeps the signature that `generate` validates its kwargs against
    def forward(self, *args, dynsdpb: DistillationInputs | None = None, labels=None, **kwargs):
        if dynsdpb is None:
            return previous_forward(*args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        return _distillation_terms(hidden, labels[:, 1:], self.get_output_embeddings(), dynsdpb)

    model.forward = types.MethodType(forward, model)


# Boolean masks make data-dependent shapes: with `torch_compile=True` the backbone is compiled, this part runs eagerly.
@torch.compiler.disable
def _distillation_terms(hidden: Tensor, labels: Tensor, head: nn.Module, inputs: DistillationInputs):
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        raise ValueError(
            "The output layer's weight is still a shard (DTensor) inside the model's forward, where DynSDPB uses it "
            "whole: FSDP made `lm_head` a unit of its own, gathered only when `lm_head` itself is called, or tensor "
            "parallelism splits it. With FSDP, keep it in a unit whose forward runs first (accelerate's FSDP2 "
            "preparation groups it with the final norm; the root unit holds it when only the decoder layers are "
            "wrapped). Tensor parallelism is not supported."
        )
    # With `device_map`, the last layer can sit on another device than the output layer.
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    response = labels != -100
    packed_hidden, packed_labels = hidden[response], labels[response]  # response tokens, row-major
    distilled = (response & inputs.distilled_rows[:, None])[response]
    # The loss takes the distilled tokens first; `order` puts them there and `restore` puts the outputs back.
    order = torch.argsort((~distilled).to(torch.uint8), stable=True)
    restore = torch.argsort(order)
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = weight.dtype
    returned_hidden = packed_hidden[(response & inputs.returned_rows[:, None])[response]].detach()
    returned_logits = None
    with torch.autocast(device_type, enabled=False):
        log_probs, distill, entropy, is_top1 = fused_distillation_loss(
            packed_hidden[order].to(compute_dtype),
            weight.to(compute_dtype),
            None if bias is None else bias.to(compute_dtype),
            packed_labels[order],
            inputs.teacher,
            inputs.teacher_is_hidden,
            inputs.kl_weight,
            inputs.temperature,
            inputs.chunk_size,
        )
        if inputs.returned_logits_dtype is not None:  # here: outside the forward, FSDP and ZeRO-3 leave a shard
            chunk_size = inputs.chunk_size or default_chunk_size(weight.shape[0])
            dtype = inputs.returned_logits_dtype
            returned_logits = project_in_chunks(returned_hidden, weight, bias, chunk_size, dtype)
    return DistillationOutput(
        log_probs=log_probs[restore],
        distill=distill,
        entropy=entropy[restore],
        is_top1=is_top1[restore],
        returned_hidden=returned_hidden,
        returned_logits=returned_logits,
    )
