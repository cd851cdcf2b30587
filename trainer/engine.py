"""The ONE DeepSpeed seam: distributed init, ZeRO training engine, collectives, sharded save/load.

Stages, losses and data never import deepspeed or torch.distributed; they get a `Distributed` (who am I,
collectives) and an `Engine` (a trainable model: forward, backward, step, save, load).

    check_device(spec)                        # a GPU-shaped job refuses to run on CPU (exit 2)
    dist = init_distributed()                 # torchrun env; NCCL on GPU, gloo on CPU
    placement = training_placement(spec.stages.dpo, spec.deepspeed, dist)   # bf16 / ZeRO-3 partitions
    model, processor = models.load_model(uri, placement=placement)         # built straight into them
    engine = Engine(model, optim=spec.stages.dpo, deepspeed_spec=spec.deepspeed, dist=dist,
                    total_steps=total)
    out = engine.model(**batch)               # the wrapped module (ZeRO-3 hooks live on it)
    engine.backward(loss); stepped = engine.step()   # optimizer steps every gradient_accumulation calls
    engine.save(local_dir, tag, client_state) ; engine.load(local_dir, tag)
    snapshot = engine.snapshot(local_dir, tag, client_state)   # host copy; snapshot.write() later, any thread

Order of events in one optimizer step (DeepSpeed's): `backward` scales the micro-batch loss by
1/gradient_accumulation and, on the accumulation boundary, averages gradients over data-parallel ranks;
`step` clips to `max_grad_norm`, runs AdamW and advances the learning-rate schedule (linear warm-up over
`warmup_ratio` of the steps, then linear decay to 0). Hence a micro-batch loss that is a mean over pairs
gives the same update for (micro-batch 4, accumulation 1, 1 rank) and (2, 1, 2 ranks) and (2, 2, 1 rank).

On CPU the same code path runs with gloo; DeepSpeed's shared-memory comm op is switched off there
because it JIT-compiles with g++ (~70 s) and brings nothing to a test of 2 processes.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch

from mmalign.api import keys
from mmalign.api.exit_codes import ExitCode

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ distributed


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job, and the collectives stages may use."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    node_rank: int = 0  # this node's index in the gang (torchrun's GROUP_RANK); 0 on a single node

    @property
    def is_rank_0(self) -> bool:
        return self.rank == 0

    @property
    def is_local_rank_0(self) -> bool:
        return self.local_rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce ("sum", "max", "min", "mean"); returns the tensor."""
        if self.world_size == 1:
            return tensor
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN, "mean": torch.distributed.ReduceOp.SUM}
        moved = tensor.to(self.device)
        torch.distributed.all_reduce(moved, op=ops[op])
        if op == "mean":
            moved /= self.world_size
        tensor.copy_(moved.to(tensor.device))
        return tensor

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over ranks (float64, so counts stay exact)."""
        tensor = torch.tensor(values, dtype=torch.float64)
        return self.all_reduce(tensor).tolist()

    def all_gather_object(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a (N, ...) tensor of every rank (same N on all ranks) along dim 0."""
        if self.world_size == 1:
            return tensor
        moved = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(moved) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, moved)
        return torch.cat(parts).to(tensor.device)

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (e.g. a NaN loss seen by one rank)."""
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def _disable_shm_comm() -> None:
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed() -> Distributed:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, GROUP_RANK, MASTER_*).

    A single process started without torchrun gets a world of one (MASTER_* defaulted to loopback).
    NCCL when CUDA is available, gloo otherwise. `MMALIGN_DIST_TIMEOUT_SECONDS` bounds collectives
    (default 1800): a rank that died makes the others fail instead of hanging forever.
    """
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        _disable_shm_comm()
        device = torch.device("cpu")
    timeout = dt.timedelta(seconds=float(os.environ.get("MMALIGN_DIST_TIMEOUT_SECONDS", "1800")))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout, verbose=False)
    return Distributed(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ["LOCAL_WORLD_SIZE"]),
        device=device,
        node_rank=int(os.environ.get("GROUP_RANK", "0")),
    )


class CpuRefused(Exception):
    """A GPU-shaped job found no CUDA device (a configuration error: exit code 2)."""

    exit_code = ExitCode.CONFIG_ERROR


def cpu_refusal(spec: Any, cuda: bool, allow_cpu: bool, stage: str | None = None) -> str | None:
    """Why this job must not run here, or None. A job is GPU-shaped when its pods get GPUs
    (`Resources.gpus_per_node()`: nvidia.com/gpu defaults to procPerNode) or it asks for bf16: on a
    process without CUDA it would silently train on CPU with gloo, orders of magnitude slower."""
    if cuda or allow_cpu:
        return None
    resources = spec.stage_resources(stage) if stage else spec.resources  # stages.<stage>.resources
    gpus = resources.gpus_per_node()
    wants = []
    if gpus > 0:
        name = resources.gpu_resource()[0]
        wants.append(f"{gpus} {name} per pod" + ("" if _gpus_written(resources) else " (= procPerNode)"))
    if spec.deepspeed.bf16:
        wants.append("deepspeed.bf16")
    if not wants:
        return None
    return (f"the job asks for GPUs ({', '.join(wants)}) but this process sees no CUDA device, so it would "
            "train on CPU with gloo; in a pod, check the node's GPU driver and device plugin. A CPU job says "
            "so: resources.requests: {nvidia.com/gpu: 0} and deepspeed.bf16: false; or set "
            f"{keys.ENV_ALLOW_CPU}=1 to run this job on CPU anyway")


def _gpus_written(resources: Any) -> bool:
    return any(name.endswith("/gpu") for name in (*resources.requests, *resources.limits))


def check_device(spec: Any, stage: str | None = None) -> None:
    """Refuse a GPU-shaped stage on a machine without CUDA (CpuRefused) unless MMALIGN_ALLOW_CPU=1."""
    reason = cpu_refusal(spec, torch.cuda.is_available(), os.environ.get(keys.ENV_ALLOW_CPU, "") == "1", stage)
    if reason:
        raise CpuRefused(reason)


def shutdown_distributed() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_worker(code: int) -> NoReturn:
    """The last call of every torchrun worker (the stages', the tests' probes, the benchmark's): destroy
    the process group, flush and leave with `code`, skipping the interpreter's teardown. With the work
    saved and the process group destroyed, C++ threads that gloo/DeepSpeed leave behind can still abort the teardown
    ("terminate called without an active exception", SIGABRT: seen in CI after the score stage, and in
    tests/trainer/snapshot_probe.py under ZeRO-3), which would turn finished work into exit 134 and a
    pointless gang restart. Outside torchrun (a plain `python -m`) it is `sys.exit(code)`."""
    shutdown_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        os._exit(code)
    sys.exit(code)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ engine


def linear_schedule(total_steps: int, warmup_ratio: float) -> Any:
    """LR multiplier: linear warm-up over warmup_ratio·total steps, then linear decay to 0 at total."""
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        remaining = max(1, total_steps - warmup)
        return max(0.0, 1.0 - (step - warmup) / remaining)

    return factor


def deepspeed_config(optim: Any, deepspeed_spec: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config from a stage's optimisation fields and the job's `deepspeed:` block."""
    zero: dict[str, Any] = {"stage": deepspeed_spec.zero_stage}
    if deepspeed_spec.zero_stage >= 2:
        zero.update(contiguous_gradients=True, overlap_comm=torch.cuda.is_available())
    if deepspeed_spec.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if deepspeed_spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": optim.gradient_accumulation,
        "train_batch_size": optim.micro_batch_size * optim.gradient_accumulation * world_size,
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(deepspeed_spec.bf16)},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if deepspeed_spec.config:
        config = _merge(config, deepspeed_spec.config)
    return config


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """On the Hugging Face model inside `model` (stages wrap it): recompute each decoder layer's
    activations in backward. Non-reentrant, as ZeRO-3 and the chunked log-probs need."""
    kwargs = {"use_reentrant": False}
    for module in model.modules():
        # transformers 5.x renamed it activation_checkpointing_enable; the old name warns (FutureWarning)
        # and goes away in v6, where looking only for it would silently train without checkpointing.
        enable = getattr(module, "activation_checkpointing_enable", None)
        if callable(enable):
            enable(activation_checkpointing_kwargs=kwargs)
        elif callable(enable := getattr(module, "gradient_checkpointing_enable", None)):
            enable(gradient_checkpointing_kwargs=kwargs)
        else:
            continue
        config = getattr(module, "config", None)
        if config is not None:
            config.use_cache = False
        return
    log.warning("gradient checkpointing asked for, but the model has no activation_checkpointing_enable "
                "(or gradient_checkpointing_enable)")


class Engine:
    """A model under DeepSpeed: AdamW + the linear schedule, ZeRO stage from the job spec.

    `optim` is a stage config with the `_Optimization` fields (learning_rate, weight_decay, ...).
    """

    def __init__(self, model: torch.nn.Module, optim: Any, deepspeed_spec: Any, dist: Distributed,
                 total_steps: int) -> None:
        import deepspeed

        self.dist = dist
        if deepspeed_spec.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        self.config = deepspeed_config(optim, deepspeed_spec, dist.world_size)
        parameters = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel per parameter group instead of torch's foreach ops, on CPU and CUDA alike
        # (3.3× faster on this 2-core CPU for 50M float32 parameters; docs/benchmarks.md). The update is
        # AdamW's, equal to the foreach one to float rounding; TRL's default (`adamw_torch_fused`) too.
        optimizer = torch.optim.AdamW(
            parameters, lr=optim.learning_rate, weight_decay=optim.weight_decay, betas=(0.9, 0.95), eps=1e-8,
            fused=True,
        )
        factor = linear_schedule(total_steps, optim.warmup_ratio)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
            config=self.config,
            dist_init_required=False,
        )

    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped model (its parameters are ZeRO-3 partitions under stage 3)."""
        return self.model.module

    @property
    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)

    def step(self) -> bool:
        """Call after every micro-batch's backward; True when the optimizer actually stepped."""
        boundary = bool(self.model.is_gradient_accumulation_boundary())
        self.model.step()
        return boundary

    def grad_norm(self) -> float | None:
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    # -- sharded checkpoints: each rank writes its own files into `folder/tag/`

    def save(self, folder: str, tag: str, client_state: dict[str, Any] | None = None) -> None:
        os.makedirs(os.path.join(folder, tag), exist_ok=True)
        self.model.save_checkpoint(folder, tag=tag, client_state=client_state or {}, save_latest=False)

    def snapshot(self, folder: str, tag: str, client_state: dict[str, Any] | None = None) -> Snapshot:
        """`save`, except that the files are not written: every state DeepSpeed would `torch.save` is
        copied into host memory, and `Snapshot.write()` (from any thread) writes the same files later.
        The caller may train on at once: the next optimizer step changes the live tensors, not the copy.
        All ranks call it (DeepSpeed's save has barriers). Costs one host copy of this rank's states."""
        original = self.model.checkpoint_engine
        capture = _Capture(self.model._config, original)
        self.model.checkpoint_engine = capture  # the one place DeepSpeed's save hands over each file's state
        try:
            self.save(folder, tag, client_state)
        finally:
            self.model.checkpoint_engine = original
        return Snapshot(capture.files, capture.zipfile_serialization)

    def load(self, folder: str, tag: str) -> dict[str, Any]:
        """Load model, optimizer and scheduler state; returns the client state saved with it."""
        path, client_state = self.model.load_checkpoint(
            folder, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag} in {folder}")
        return client_state or {}

    def load_resized(self, folder: str, tag: str) -> dict[str, Any]:
        """`load` of a checkpoint written by another world size (`folder/tag` holds every rank's files).

        ZeRO-1/2/3 partition the optimizer state per rank, so DeepSpeed refuses a plain load; the first
        local rank converts the checkpoint to DeepSpeed's universal format (one folder per parameter:
        fp32 weights, Adam moments) and every rank loads it with `load_universal`, taking its new
        partition. ZeRO-0 checkpoints hold no partitions: a plain load."""
        if self.config["zero_optimization"]["stage"] == 0:
            return self.load(folder, tag)
        universal = f"{tag}-universal"
        if self.dist.is_local_rank_0:
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            ds_to_universal(argparse.Namespace(
                input_folder=os.path.join(folder, tag), output_folder=os.path.join(folder, universal),
                num_extract_workers=4, num_merge_workers=2, keep_temp_folder=False, strict=True,
                inject_missing_state=True,  # models that are not Megatron's carry no universal-checkpoint info
            ))
        self.dist.barrier()
        # read when loading only, so set for this one load (the engine was built for plain checkpoints)
        self.model._config.load_universal_checkpoint = True
        try:
            return self.load(folder, universal)
        finally:
            self.model._config.load_universal_checkpoint = False

    @contextmanager
    def full_parameters(self) -> Iterator[torch.nn.Module]:
        """The whole module with all parameters present on every rank (gathers ZeRO-3 partitions)."""
        if self.config["zero_optimization"]["stage"] == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield self.module
        else:
            yield self.module

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """A full (unsharded) state dict on rank 0, for the final Hugging Face folder; {} elsewhere."""
        if self.config["zero_optimization"]["stage"] == 3:
            state = self.model._zero3_consolidated_16bit_state_dict()
            return state if self.dist.is_rank_0 else {}
        return self.module.state_dict() if self.dist.is_rank_0 else {}


@dataclass
class Snapshot:
    """One rank's checkpoint files held in host memory (Engine.snapshot): (path, state) in the order
    DeepSpeed saved them. `write()` writes each with torch.save as DeepSpeed's own engine does (same
    serialization), so `Engine.load` reads them like any checkpoint; it frees each copy once written."""

    files: list[tuple[str, Any]]
    zipfile_serialization: bool = True

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held (what the copy cost in host memory)."""
        return sum(_tensor_bytes(state, set()) for _, state in self.files)

    def write(self) -> None:
        while self.files:
            path, state = self.files.pop(0)
            torch.save(state, path, _use_new_zipfile_serialization=self.zipfile_serialization)
            del state


class _Capture:
    """DeepSpeed's checkpoint engine (`original`: create, makedirs, commit, ... pass through), except that
    `save(state_dict, path)` keeps a host copy of the state instead of writing it."""

    def __init__(self, config: Any, original: Any) -> None:
        self._original = original
        self.files: list[tuple[str, Any]] = []
        # DeepSpeed's TorchCheckpointEngine reads the same flag (checkpoint.checkpoint_serialization)
        self.zipfile_serialization = bool(config.checkpoint_config.get("checkpoint_serialization", True))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)

    def save(self, state_dict: Any, path: str) -> None:
        self.files.append((path, host_copy(state_dict, {})))

    def preserves_storage_sharing(self) -> bool:
        return False  # DeepSpeed would clone the model states first; host_copy already makes compact copies


def host_copy(item: Any, memo: dict[int, torch.Tensor]) -> Any:
    """`item` with every tensor replaced by a compact copy in host memory (a view of a flat ZeRO buffer
    becomes a tensor of its own elements only); containers rebuilt, other values deep-copied (e.g. the
    loss scaler, whose state a later step changes). A tensor met twice (tied weights) is copied once
    (`memo`: id -> copy), so the file keeps them tied as torch.save of the original would."""
    if isinstance(item, torch.Tensor):
        if id(item) not in memo:
            memo[id(item)] = item.detach().to("cpu", copy=True)
        return memo[id(item)]
    if isinstance(item, dict):
        out = copy.copy(item)  # keeps the type (OrderedDict, defaultdict's factory)
        for key, value in item.items():
            out[key] = host_copy(value, memo)
        return out
    if isinstance(item, list):
        return [host_copy(value, memo) for value in item]
    if isinstance(item, tuple):
        values = [host_copy(value, memo) for value in item]
        if all(new is old for new, old in zip(values, item, strict=True)):
            return item  # nothing mutable inside (e.g. torch.Size)
        return type(item)(*values) if hasattr(item, "_fields") else type(item)(values)
    return copy.deepcopy(item)


def _tensor_bytes(item: Any, seen: set[int]) -> int:
    if isinstance(item, torch.Tensor):
        if id(item) in seen:
            return 0
        seen.add(id(item))
        return item.numel() * item.element_size()
    if isinstance(item, dict):
        return sum(_tensor_bytes(value, seen) for value in item.values())
    if isinstance(item, list | tuple):
        return sum(_tensor_bytes(value, seen) for value in item)
    return 0


def register_external_parameters(module: torch.nn.Module, deepspeed_spec: Any) -> None:
    """ZeRO-3: the LM head weight is read outside its own module's forward (logprobs.py multiplies
    hidden states by it in chunks), so DeepSpeed must gather it around `module`'s forward/backward."""
    if deepspeed_spec.zero_stage != 3:
        return
    import deepspeed

    for sub in module.modules():
        head = getattr(sub, "get_output_embeddings", None)
        if callable(head) and head() is not None and sub is not module:
            deepspeed.zero.register_external_parameter(module, head().weight)
            return


# ------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class Placement:
    """How a model's weights come into memory (models.load_model reads it).

    `dtype`: the job's precision, bf16 when `deepspeed.bf16` (the optimizer keeps its own float32
    master copy), else float32. `zero3`: the DeepSpeed config when the model will be ZeRO-3-partitioned:
    transformers' own ZeRO-3 integration (HfDeepSpeedConfig, which `is_deepspeed_zero3_enabled()` reads)
    then builds every parameter already partitioned (deepspeed.zero.Init) and copies the checkpoint into
    the partitions module by module, so no rank ever holds a full float32 model. Rank 0 reads the
    checkpoint's tensors (memory-mapped safetensors, in the file's dtype); the other ranks read only
    names and shapes (measured: docs/trainer.md, Loading). `device`: a whole model (no `zero3`) on a GPU
    loads straight onto it (`device_map`), instead of one host copy per rank first (8 per node)."""

    dtype: torch.dtype = torch.float32
    zero3: dict[str, Any] | None = None
    device: torch.device | None = None

    @contextmanager
    def building(self) -> Iterator[None]:
        """The models made inside are ZeRO-3-partitioned as they are built (when `zero3` is set)."""
        if self.zero3 is None:
            yield
            return
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        hf_config = HfDeepSpeedConfig(self.zero3)  # transformers holds a weak reference: keep ours alive
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del hf_config


def precision(deepspeed_spec: Any) -> torch.dtype:
    return torch.bfloat16 if deepspeed_spec.bf16 else torch.float32


def training_placement(optim: Any, deepspeed_spec: Any, dist: Distributed) -> Placement:
    """For a model `Engine(model, optim, deepspeed_spec, dist, ...)` will train: the engine's own config."""
    zero3 = deepspeed_config(optim, deepspeed_spec, dist.world_size) if deepspeed_spec.zero_stage == 3 else None
    return Placement(precision(deepspeed_spec), zero3, _gpu(dist) if zero3 is None else None)


def frozen_placement(deepspeed_spec: Any, dist: Distributed, *, shard: bool) -> Placement:
    """For a model `frozen(model, deepspeed_spec, dist, shard=shard)` will take (the same rule)."""
    sharded = shard and deepspeed_spec.zero_stage == 3 and dist.world_size > 1
    if sharded:
        return Placement(precision(deepspeed_spec), _frozen_config(deepspeed_spec))
    return Placement(precision(deepspeed_spec), None, _gpu(dist))


def _gpu(dist: Distributed) -> torch.device | None:
    return dist.device if dist.device.type == "cuda" else None


def _frozen_config(deepspeed_spec: Any) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
            "bf16": {"enabled": bool(deepspeed_spec.bf16)}}


_Module = TypeVar("_Module", bound=torch.nn.Module)


def frozen(model: _Module, deepspeed_spec: Any, dist: Distributed, *, shard: bool) -> _Module:
    """A frozen model for inference (DPO reference, reference precompute, scoring), in eval mode.

    `shard=True`: ZeRO-3-sharded over the ranks when the job runs ZeRO-3 on more than one rank. Every
    rank must then run the same number of forward passes (each gathers parameters from all ranks), as
    the DPO training loop does. `shard=False`: a whole replica on this rank's device, for passes whose
    per-rank counts differ (the reference precompute's blocks, the score stage's shards). Load the model
    with `frozen_placement(deepspeed_spec, dist, shard=shard)`: ZeRO-3 partitions are then built straight
    from the checkpoint, and a replica is already in the job's precision (cast to bf16 on GPU otherwise)."""
    model.requires_grad_(False)
    model.eval()
    if shard and deepspeed_spec.zero_stage == 3 and dist.world_size > 1:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=_frozen_config(deepspeed_spec),
                                          dist_init_required=False)
        engine.eval()
        sharded: _Module = engine.module  # `model` itself, its parameters now ZeRO-3 partitions
        return sharded
    if deepspeed_spec.bf16 and dist.device.type == "cuda":
        model = model.to(torch.bfloat16)
    return model.to(dist.device)
