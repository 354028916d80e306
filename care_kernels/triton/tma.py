"""Host-side TMA (tensor memory accelerator) descriptors for the kernels' operand tiles, Hopper and later.

A descriptor names a 2-D row-major tensor and the block a kernel copies at a time; the kernel then loads a
block with `desc.load([row, col])` in one bulk copy, with zeros for the part past the tensor's edge. The block
shape is the autotuner config's tile, so each config's `pre_hook` (`set_block_shapes`) writes it into the
descriptors before that config runs. Warp-specialized configs build their descriptors in the kernel instead,
which takes Triton's global-scratch allocator (`ensure_scratch_allocator`).
"""

from __future__ import annotations

import torch
import triton

try:  # Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer path only
    TensorDescriptor = None

# Kernel argument -> which tile dimension its block's rows take (hidden: a row block, weight: a column tile).
_DESCRIPTOR_ROWS = {"h_desc": "BLOCK_M", "w_desc": "BLOCK_N", "ref_h_desc": "BLOCK_M", "ref_w_desc": "BLOCK_N"}


def usable(*tensors: torch.Tensor | None, interpret: bool) -> bool:
    """Whether every tensor can back a descriptor: 16-bit, 2-D contiguous, 16-byte aligned base and rows.

    On a GPU, also an NVIDIA one of compute capability 9.0 or later (the interpreter emulates descriptors).
    """
    if TensorDescriptor is None:
        return False
    present = [t for t in tensors if t is not None]
    if not interpret and not (torch.version.hip is None and all(
        t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9 for t in present
    )):  # fmt: skip  (ROCm's MI300 reports capability 9.4, and has no TMA)
        return False
    return all(
        t.dtype in (torch.float16, torch.bfloat16)
        and t.dim() == 2
        and t.is_contiguous()
        and t.data_ptr() % 16 == 0
        and (t.shape[1] * t.element_size()) % 16 == 0
        and t.shape[0] > 0
        for t in present
    )


def descriptor(t: torch.Tensor, block_rows: int, block_k: int):
    """A descriptor of t [rows, K] with blocks [block_rows, block_k] (set_block_shapes may change them)."""
    return TensorDescriptor.from_tensor(t, [block_rows, block_k])


def set_block_shapes(nargs: dict) -> None:
    """Autotuner pre_hook: each descriptor argument gets the config's tile as its block shape."""
    for name, rows in _DESCRIPTOR_ROWS.items():
        desc = nargs.get(name)
        if desc is not None:
            desc.block_shape = [nargs[rows], nargs["BLOCK_K"]]


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    del alignment, stream  # torch's caching allocator aligns to 512 bytes and orders by the current stream
    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


def ensure_scratch_allocator() -> None:
    """Kernels that build descriptors on the device (`tl.make_tensor_descriptor`, 128 bytes each per program)
    take that memory from Triton's global-scratch allocator, which is unset by default: set one backed by
    torch's caching allocator, unless this context already has one (the user's own stays; with a Triton whose
    internals moved, where that cannot be told, ours is set)."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator

        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # pragma: no cover - a Triton whose internals moved: set ours
        pass
    triton.set_allocator(_torch_scratch)
