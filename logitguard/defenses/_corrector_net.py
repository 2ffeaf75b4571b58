"""The torch side of the logit corrector: its network (C → D → C), a fast dropout and inference with a module.

Imported only to train, to run on a GPU, or where a torch module is asked for (`LogitCorrector.model_`,
`logitguard.explain`, the mirrors in `producers`); applying a saved corrector on the CPU needs NumPy
only (`logitguard.defenses.corrector`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_INFERENCE_BATCH = 4096
_GPU_INFERENCE_BATCH = 65536  # rows per chunk on a GPU: large enough to keep the matrix units busy


class FastDropout(nn.Module):
    """Inverted dropout like `nn.Dropout`, drawing its mask from 16-bit random words.

    CPU `bernoulli_` draws one random number per element and took 65% of a training step at D=10,000;
    16-bit words (four per 64-bit draw) make the step about 3x faster. The drop probability is
    rounded to a multiple of 1/65536. No parameters, so saved weights match `nn.Dropout`'s layout.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self._threshold = round(p * 65536) - 32768  # keep where the signed 16-bit word >= threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        words = torch.randint(-(1 << 63), (1 << 63) - 1, ((x.numel() + 3) // 4,), dtype=torch.int64,
                              device=x.device).view(torch.int16)[: x.numel()].view(x.shape)
        return x * (words >= self._threshold).to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def build_mlp(num_classes: int, hidden: int, dropout: float) -> nn.Sequential:
    """C → D → C with ReLU and dropout after the hidden layer (Algorithm 1's network).

    Its ``state_dict`` keys are those of `logitguard.defenses.corrector.WEIGHT_KEYS`.
    """
    return nn.Sequential(nn.Linear(num_classes, hidden), nn.ReLU(), FastDropout(dropout), nn.Linear(hidden, num_classes))



def correct_with_module(model: nn.Module, logits: np.ndarray, device: str) -> np.ndarray:
    """`model`'s outputs (N, C) float32 for contiguous float32 logits (N, C), computed on `device` chunk by chunk;
    on a CUDA device through `correct_pipelined`."""
    if torch.device(device).type == "cuda":
        return correct_pipelined(model, logits, device)
    out = np.empty_like(logits)
    with torch.inference_mode():
        for start in range(0, len(logits), _INFERENCE_BATCH):
            x = torch.tensor(logits[start:start + _INFERENCE_BATCH], device=device)  # copy: views may be read-only
            out[start:start + len(x)] = model(x).float().cpu().numpy()
    return out


def correct_pipelined(model: nn.Module, logits: np.ndarray, device: str) -> np.ndarray:
    """`correct_with_module` on a GPU: while chunk i computes, chunk i+1 uploads and chunk i-1 downloads.

    Uploads and downloads run on their own CUDA streams through two pairs of pinned host buffers used
    in turn, so the transfers hide behind the matrix products. (Page-locking NumPy's own memory in
    place, ``cudaHostRegister``, measured slower: locking 8 GB took longer than the staging copies.)
    """
    device = torch.device(device)
    n, c = logits.shape
    rows = min(n, _GPU_INFERENCE_BATCH)
    out = np.empty_like(logits)
    host_in, host_out = torch.from_numpy(logits), torch.from_numpy(out)  # torch's CPU copies use every core
    up, down, compute = torch.cuda.Stream(device), torch.cuda.Stream(device), torch.cuda.current_stream(device)
    pinned_in = [torch.empty((rows, c), pin_memory=True) for _ in range(2)]
    pinned_out = [torch.empty((rows, c), pin_memory=True) for _ in range(2)]
    on_device = [torch.empty((rows, c), device=device) for _ in range(2)]
    pending: list[tuple[torch.cuda.Event, slice] | None] = [None, None]

    def collect(b: int) -> None:  # wait for buffer b's download and copy it out
        if pending[b] is not None:
            event, rows_done = pending[b]
            event.synchronize()
            host_out[rows_done].copy_(pinned_out[b][:rows_done.stop - rows_done.start])
            pending[b] = None

    with torch.inference_mode():
        for i, start in enumerate(range(0, n, rows)):
            b, stop = i % 2, min(start + rows, n)
            collect(b)  # also means buffer b's upload and compute are finished
            pinned_in[b][:stop - start].copy_(host_in[start:stop])
            with torch.cuda.stream(up):
                on_device[b][:stop - start].copy_(pinned_in[b][:stop - start], non_blocking=True)
            compute.wait_stream(up)
            result = model(on_device[b][:stop - start])
            down.wait_stream(compute)
            with torch.cuda.stream(down):
                pinned_out[b][:stop - start].copy_(result, non_blocking=True)
                event = torch.cuda.Event()
                event.record(down)
            result.record_stream(down)
            pending[b] = (event, slice(start, stop))
        collect(0)
        collect(1)
    return out
