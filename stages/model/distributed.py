"""The trainer group's side of scale-out: plain torch.distributed, no Ray in here.

Every trainer process reads the whole iteration (its files are small next to the model),
walks the same seeded minibatch order, and takes its `Rank.share` of each minibatch. The
loss normaliser (`objective.loss_normaliser`) is computed from the whole minibatch on every
rank, so `dapo`'s token count and `grpo`'s completion count are global without a collective.
Each rank's loss is then its share of the single-process loss, and the gradients must be
*summed* across ranks: DDP and FSDP2 average, so the backward scales the loss by the world
size (`Rank.gradient_scale`). The step then equals the single-process step within float
summation order (tests/test_scale_out.py checks it for ddp and fsdp and every loss_agg).

Both wrappers arm their gradient hooks in the wrapped module's forward, and our log-probs
are read from the body and the LM head separately (`stages.model.logprobs`): so the module they
wrap is `LogprobReader`, whose forward is the whole read-out.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stages.config import Params
from stages.errors import ModelError
from stages.model.generation import shared_prompt_logprobs
from stages.model.logprobs import readout


def uses_ray(params: Params) -> bool:
    """Whether any process of the run lives outside this one. Every default: no. With the vLLM
    engine the trainer is this process and the servers are vLLM's own: Ray places nothing."""
    if params.rollout.engine == "vllm":
        return False
    d = params.distributed
    return d.address != "" or d.trainers > 1 or d.rollout_workers > 1 or params.rollout.max_lag > 0


def needs_ray(params: Params) -> bool:
    return uses_ray(params) or params.reward.workers > 0


@dataclass(frozen=True)
class Rank:
    """This process's place in the trainer group; `Rank()` is the single process."""

    rank: int = 0
    world: int = 1

    def share(self, rows: Tensor) -> Tensor:
        """This rank's contiguous share of `rows` (equal shares: config checks the division)."""
        return rows.tensor_split(self.world)[self.rank] if self.world > 1 else rows

    @property
    def gradient_scale(self) -> float:
        return float(self.world)  # undoes DDP's and FSDP's average: the shares' gradients add up


def join_group(rank: int, world: int, host: str, port: int, device: torch.device, timeout_seconds: float) -> Rank:
    """Join the trainers' process group: gloo on CPU, nccl on CUDA. A peer that dies makes the
    survivors' collectives fail (gloo sees the socket close) or, at worst, time out."""
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://{host}:{port}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=timeout_seconds))
    return Rank(rank, world)


class LogprobReader(nn.Module):
    """The policy's per-token log-probs (and entropy) of completions, as one module's forward."""

    def __init__(self, policy: nn.Module, share_prompts: bool = True) -> None:
        super().__init__()
        self.policy = policy
        # Under FSDP2 every rank must run each layer's forward as often as the others (each one
        # all-gathers): one forward per call, whatever prompts a rank's rows share.
        self.share_prompts = share_prompts

    def forward(self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                temperature: float = 1.0, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        logp, entropy = shared_prompt_logprobs(self.policy, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                               temperature=temperature, with_entropy=with_entropy,
                                               share=self.share_prompts)
        if not self.share_prompts:  # FSDP2 hooks the backward onto the outputs: no views of its buffers
            logp, entropy = logp.clone(), None if entropy is None else entropy.clone()
        return logp, entropy


def _layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP2 shards one by one: the classes transformers marks as never split."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    base = getattr(model, "get_base_model", lambda: model)()  # peft: the wrapped transformers model
    names |= set(getattr(base, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def distribute(model: nn.Module, strategy: str, rank: Rank) -> nn.Module:
    """The module the update calls for log-probs: `model` read out whole, or wrapped for the group."""
    readout(model)  # probe the head once now: under FSDP the model's own forward no longer runs alone
    reader = LogprobReader(model)
    if rank.world == 1:
        return reader
    if strategy == "ddp":
        # Rotary and other buffers are computed, not learned: nothing to broadcast each step.
        device_ids = [model.device.index] if model.device.type == "cuda" else None
        with warnings.catch_warnings():  # its replacement still syncs at init, which is what we avoid
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            return nn.parallel.DistributedDataParallel(reader, device_ids=device_ids, broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    layers = _layers(model)
    if not layers:
        raise ModelError(f"distributed.strategy: fsdp cannot wrap {type(model).__name__}: it names no transformer "
                         f"block class (_no_split_modules) to shard; use distributed.strategy: ddp")
    reader.share_prompts = False
    for layer in layers:
        fully_shard(layer)
    fully_shard(reader)
    for module in [*layers, reader]:
        # gloo has averaged FSDP2 gradients wrongly (pytorch#162338): reduce with SUM, divide after.
        module.set_force_sum_reduction_for_comms(True)
    return reader


def accumulating(reader: nn.Module, last: bool) -> Any:
    """Within: a micro-batch's backward adds to the gradients; only the last one's reduces them."""
    if isinstance(reader, nn.parallel.DistributedDataParallel):
        return nullcontext() if last else reader.no_sync()
    if hasattr(reader, "set_requires_gradient_sync"):  # FSDP2
        reader.set_requires_gradient_sync(last)
    return nullcontext()


def all_sum(values: list[float], rank: Rank) -> list[float]:
    """Each value summed over the group (one collective); unchanged in a single process."""
    if rank.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_sum_tensor(tensor: Tensor, rank: Rank) -> Tensor:
    if rank.world > 1:
        dist.all_reduce(tensor)
    return tensor


def plain(value: Tensor) -> Tensor:
    """A DTensor (FSDP2's parameters and norms) as a plain tensor; others unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def is_sharded(reader: nn.Module) -> bool:
    return hasattr(reader, "set_requires_gradient_sync")


def full_state_dict(reader: nn.Module, model: nn.Module) -> dict[str, Tensor]:
    """The model's whole state dict on CPU, under the model's own keys (collective under FSDP)."""
    if not is_sharded(reader):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(reader, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key.removeprefix("policy."): value for key, value in state.items()}


def _trainable_names(reader: nn.Module) -> list[str]:
    """Names of the optimizer's parameters, in `model.parameters()` order (the optimizer's own)."""
    return [name for name, parameter in reader.named_parameters() if parameter.requires_grad]


def full_optimizer_state(reader: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state as a single process's `state_dict()` holds it (parameters by index),
    gathered whole under FSDP2 (collective): a checkpoint is the same file for every strategy."""
    if not is_sharded(reader):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(reader, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:  # with cpu_offload only rank 0 receives the whole state
        return {}
    index = {name: number for number, name in enumerate(_trainable_names(reader))}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def load_full_optimizer_state(reader: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The inverse of `full_optimizer_state`: every rank reads the whole state and keeps its shard."""
    if not is_sharded(reader):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _trainable_names(reader)
    by_name = {"state": {names[number]: value for number, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[number] for number in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(reader, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
