"""Peak memory of one call: live tensor storage on the CPU, the allocator's peak on CUDA.

On the CPU torch keeps no allocation statistics, so `LiveStorageBytes`, a
`TorchDispatchMode`, watches every tensor an operator returns while it is active and
adds up the bytes of the storages still alive. Storages that existed before the mode
(parameters, inputs, gradients from an earlier step) are not counted, nor are views
of them; storages made during it are, gradients created by a backward pass included.

A storage is released when its own Python object dies, not when the tensor that
brought it in does: autograd saves detached copies of outputs for the backward pass,
which keep a storage alive after every tensor the caller saw is gone. Torch keeps a
storage's Python object alive as long as the storage, so a `weakref.finalize` on it
fires when the memory is actually given back.

What it cannot see: scratch memory an operator allocates and frees inside its own
kernel, and the allocator's rounding. It is a count of tensor bytes, comparable
between two designs measured the same way, not the process's footprint.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveStorageBytes", "peak_bytes"]


class LiveStorageBytes(TorchDispatchMode):  # type: ignore[no-untyped-call]  # torch's base is untyped
    """Counts the bytes of live tensor storages created while the mode is active.

    Example:
        >>> with LiveStorageBytes() as tracker:
        ...     x = torch.empty(1024, dtype=torch.uint8)
        ...     del x
        >>> tracker.peak, tracker.live
        (1024, 0)

    Attributes:
        live: Bytes of the tracked storages alive now.
        peak: Largest value `live` has had.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch's base is untyped
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, int] = {}  # storage data_ptr -> bytes

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs: set[int] = set()
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                inputs.add(leaf.untyped_storage().data_ptr())
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        """Count `tensor`'s storage once, until it dies, unless it is an input's.

        An output sharing an input's storage (a view, an in-place or `out=` result)
        allocated nothing: its storage is either counted already or older than the mode.
        """
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer == 0 or pointer in inputs or pointer in self._tracked:
            return
        size = storage.nbytes()
        self._tracked[pointer] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, pointer)

    def _release(self, pointer: int) -> None:
        """A tracked storage died: its bytes are no longer live."""
        self.live -= self._tracked.pop(pointer, 0)


def peak_bytes(step: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of `step`, above what was allocated before it.

    Args:
        step: The call to measure; what it returns is dropped at once.
        device: Where `step` computes: CUDA uses `torch.cuda.max_memory_allocated`,
            anything else `LiveStorageBytes`.

    Returns:
        The peak, in bytes.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = LiveStorageBytes()
    with tracker:
        step()
    return tracker.peak
