"""Every use of a private API of torch and diffusers, in one place, each named by what it does here. Checked against
torch 2.13 (CPU) and 2.11 (CUDA 13) and diffusers 0.42.1, the pinned versions; a new version is checked here first.
Everything else in the package uses only public APIs. (The pipeline layer, the lowest that uses torch and diffusers,
so that every part may use it.)"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

import torch

# -- torch: FP8 GEMMs (torch._scaled_mm: e4m3 operands, row-wise or per-tensor scales, fast accumulation)
scaled_mm = torch._scaled_mm


# -- torch: fault injection counts the storages each aten op creates (a dispatch mode over the ops' tensors)
def dispatch_mode_base() -> type:
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def flat_tensors(tree) -> list:
    return flatten(tree)[0]


# -- torch: a nested call's arguments as leaves and back (a hooked block's forward captured per shape, model.graphs)
def flatten(tree) -> tuple[list, object]:
    from torch.utils._pytree import tree_flatten

    return tree_flatten(tree)


def unflatten(leaves: list, spec):
    from torch.utils._pytree import tree_unflatten

    return tree_unflatten(leaves, spec)


def is_view(tensor: torch.Tensor) -> bool:
    return tensor._is_view()


# -- torch: AOTInductor's C++ compiler (the engines' build checks how it links libstdc++)
def cpp_compiler() -> str:
    from torch._inductor.cpp_builder import get_cpp_compiler

    return get_cpp_compiler()


# -- torch.distributed: the process groups of this process, their timeouts, their errors, their abort
def process_groups() -> list:
    import torch.distributed as dist

    return list(dist.distributed_c10d._world.pg_map)


def set_group_timeout(group, timeout_s: float) -> None:
    import torch.distributed as dist

    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)


def group_error(group) -> str | None:
    """The error NCCL's watchdog found on ``group`` (it then aborted it), or ``None``."""
    error = group._get_backend(torch.device("cuda")).get_error()
    return None if error.name == "SUCCESS" else error.name.lower()


def abort_process_groups() -> None:
    import torch.distributed as dist

    dist.distributed_c10d._abort_process_group()


def wait_collective(output: torch.Tensor) -> torch.Tensor:
    """A functional collective's result once its data has arrived."""
    return torch.ops._c10d_functional.wait_tensor(output)


@contextlib.contextmanager
def one_accelerator() -> Iterator[None]:
    """diffusers places rank r on ``r % torch.accelerator.device_count()``, which divides by zero on a host without
    an accelerator: there, for the block, the count is 1 (every rank is the CPU)."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


# -- diffusers: the hooks (cache hooks' per-context state, the forward a hook wraps), repeated blocks, FluxPipeline
def hook_state_managers(transformer: torch.nn.Module) -> list:
    """Every ``StateManager`` of the stateful hooks on ``transformer`` (one per hooked block or model)."""
    from diffusers.hooks.hooks import StateManager

    return [attr for hook in _all_hooks(transformer) for attr in vars(hook).values() if isinstance(attr, StateManager)]


def context_states(manager) -> dict:
    """A ``StateManager``'s state per cache context, by context name."""
    return manager._state_cache


def agree_first_block_decisions(transformer: torch.nn.Module, total) -> int:
    """Make every first-block cache decision on ``transformer`` global: the relative change of the head block's
    residual is summed over every rank's shard (``total``: an in-place all-reduce of a 1-D tensor, summing) before it
    is compared with the threshold, so that all context-parallel ranks skip or compute together. Returns how many
    hooks it changed."""
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    def should_compute(hook, residual: torch.Tensor) -> bool:
        previous = hook.state_manager.get_state().head_block_residual
        if previous is None:
            return True
        sums = torch.stack([(residual - previous).abs().sum(), previous.abs().sum()]).double()
        total(sums)
        return (sums[0] / sums[1]).item() > hook.threshold

    hooks = [hook for hook in _all_hooks(transformer) if isinstance(hook, FBCHeadBlockHook)]
    for hook in hooks:
        hook._should_compute_remaining_blocks = should_compute.__get__(hook)
    return len(hooks)


def _all_hooks(transformer: torch.nn.Module) -> list:
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    return [hook for child in (registry, *registry._get_child_registries()) for hook in child.hooks.values()]


def hooked_forward(module):
    """The reference through which a diffusers hook with its own ``new_forward`` calls ``module``'s forward."""
    registry = getattr(module, "_diffusers_hook", None)
    return next((ref for ref in registry._fn_refs if ref.original_forward is not None), None) if registry else None


def hooked_block_forwards(transformer) -> list:
    """The references through which diffusers' step-cache hooks call forwards inside ``transformer``'s repeated blocks
    (every block for MagCache and first-block caching, the attention modules for TaylorSeer; not the context-parallel
    hooks on the model and its output layer)."""
    blocks = [block for block in transformer.modules() if type(block).__name__ in repeated_blocks(transformer)]
    inside = {id(module) for block in blocks for module in block.modules()}
    found = [(module, hooked_forward(module)) for module in transformer.modules() if id(module) in inside]
    return [reference for _, reference in found if reference is not None]


def unhooked_step_edges(transformer) -> list:
    """The modules a step runs around ``transformer``'s repeated blocks (FLUX's embedders, rotary embedding, output
    norm and projection) that no diffusers hook wraps (context parallelism's gather wraps the output projection)."""
    unhooked = (module for module in transformer.children() if getattr(module, "_diffusers_hook", None) is None)
    return [module for module in unhooked if not isinstance(module, torch.nn.ModuleList)]


def repeated_blocks(transformer) -> tuple[str, ...]:
    """The class names of the blocks diffusers' regional compile compiles once each."""
    return tuple(transformer._repeated_blocks)


def latent_image_ids(height: int, width: int, device, dtype: torch.dtype) -> torch.Tensor:
    """``FluxPipeline``'s ids of a packed latent of ``height`` x ``width`` tokens."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(None, height, width, device, dtype)


def unpack_latents(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``FluxPipeline``'s unpacking of packed latents for its VAE."""
    return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
