"""One training step of K dense autoencoders at once: batched forward, hand-written backward.

``Backprop`` writes each model's gradients into its slice of the chunk's gradient storage and
returns the rows' losses; ``Workspace`` keeps the scratch tensors from step to step and chunk to
chunk. Used by :func:`hpcad.model.ensemble.train_ensemble`.
"""
from __future__ import annotations

import numpy as np
import torch


class Workspace:
    """Scratch tensors reused from step to step and from chunk to chunk (pass one to successive
    ``train_ensemble`` calls): a fresh megabyte-sized CPU tensor costs page faults that, for these
    small matmuls, take as long as the arithmetic. Each name keeps the largest storage asked for."""

    def __init__(self) -> None:
        self._t: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}  # (name, shape, device) -> view of _t[name]

    def __call__(self, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (name, tuple(shape), str(device))
        view = self._views.get(key)
        if view is not None:
            return view
        numel = int(np.prod(shape))
        device = torch.device(device)
        t = self._t.get(name)
        if t is None or t.numel() < numel or t.device.type != device.type or (
                device.index is not None and t.device.index != device.index):
            t = self._t[name] = torch.empty(numel, device=device)
            self._views = {k: v for k, v in self._views.items() if k[0] != name}  # views of the old storage
        view = self._views[key] = t[:numel].view(shape)
        return view


def mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cdt: torch.dtype,
        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out = bias + a @ b`` (batched), the product in ``cdt``; written into ``out`` (float32)."""
    if cdt == torch.float32:
        return torch.bmm(a, b, out=out) if bias is None else torch.baddbmm(bias, a, b, out=out)
    r = torch.bmm(a.to(cdt), b.to(cdt)) if bias is None else torch.baddbmm(bias.to(cdt), a.to(cdt), b.to(cdt))
    return out.copy_(r)


def sq_err(diff: torch.Tensor) -> torch.Tensor:
    """Per-row sum of squared errors (the alarm signal), in one pass over ``diff``."""
    return torch.linalg.vector_norm(diff, dim=-1).square_()


def row_loss(sq: torch.Tensor, n_metrics: int, code: torch.Tensor, l1: float) -> torch.Tensor:
    """The training objective per row: mean squared reconstruction error (+ L1 on the code)."""
    loss = sq / n_metrics
    return loss + l1 * code.abs().sum(-1) if l1 > 0 else loss


class Backprop:
    """Forward and hand-written backward of K dense autoencoders on one batch [K, B, M] per step,
    gradients written into ``grads``; returns each row's loss [K, B]. Built once per epoch (views,
    transposes, buffers), so a step issues only its arithmetic: at these sizes Python and dispatch
    time per call is a visible share of a step.

    The objective is sum over rows of ``w_row`` x (mean squared error + ``l1`` x |code|_1), with
    ``trim`` over the rows :meth:`trimmed` keeps: the same as autograd through ``forward``
    (test_ensemble checks both against a plain loop), without building a graph for a few tiny
    matmuls per step. The row weights of the output layer are folded into its narrower input
    (hidden width, not metric count). Matmuls run in ``cdt`` (float32, or
    bfloat16 for ``compute.precision=bf16``) into reused buffers; everything else in float32.
    """

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor], batch: int, n_encoder: int,
                 l1: float, cdt: torch.dtype, buf: Workspace, trim: float = 0.0) -> None:
        K, M = params[0].shape[:2]
        dev = params[0].device
        self.M, self.n_encoder, self.l1, self.cdt, self.grads, self.trim = M, n_encoder, l1, cdt, grads, trim
        self.W, self.WT = params[0::2], [W.transpose(1, 2) for W in params[0::2]]
        self.b = [b.unsqueeze(1) for b in params[1::2]]
        self.acts = [buf(f"a{i}", (K, batch, W.shape[2]), dev) for i, W in enumerate(self.W)]
        # gradient w.r.t. the input of each layer but the first (the data needs none)
        self.d = {i: buf(f"d{i}", (K, batch, W.shape[1]), dev) for i, W in enumerate(self.W) if i > 0}
        self.hw = buf("hw", self.d[len(self.W) - 1].shape, dev)
        self.dw = buf("dw", self.acts[-1].shape, dev)
        # Gradients: written by the matmul in place where the parameter is a contiguous tensor;
        # otherwise (padded storage) through a contiguous scratch tensor, as a matmul writing into a
        # strided output is several times slower.
        self.targets = []
        for i, g in enumerate(grads):
            g = g.view(K, -1, g.shape[-1])
            self.targets.append((g, None if g.is_contiguous() else buf(f"g{i}", g.shape, dev)))

    def weights(self, w_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row factors of a step with row weights ``w_row`` (reusable while they stay the same)."""
        return w_row, (w_row * (2.0 / self.M)).unsqueeze(-1)

    def trimmed(self, losses: torch.Tensor, w_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors with each model's ``trim`` share of its batch rows (those weighted, the highest
        losses first; ties by position) left out, the others' weights scaled to the same total: a step
        of the mean loss over the rows kept (a trimmed loss, robust to anomalies among the training rows)."""
        live = w_row > 0
        drop = torch.floor(live.sum(1, keepdim=True) * self.trim)
        key = torch.where(live, losses, torch.full_like(losses, -torch.inf))
        rank = key.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0: the row of the highest loss
        kept = w_row * (rank >= drop)
        return self.weights(kept * (w_row.sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp(min=1e-30)))

    def _grad(self, i: int, a: torch.Tensor, b: torch.Tensor, dt: torch.dtype) -> None:
        dst, scratch = self.targets[i]
        if scratch is None or dt != torch.float32:
            mm(dst, a, b, dt)
        else:
            dst.copy_(mm(scratch, a, b, dt))

    def __call__(self, x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor],
                 x_in: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: the batch and the reconstruction target; ``x_in``: the input when it differs
        (denoising: the batch plus noise)."""
        w_row, w = weights
        cdt, l1, acts, n_encoder = self.cdt, self.l1, self.acts, self.n_encoder
        last = len(self.W) - 1
        x_in = x if x_in is None else x_in
        h = x_in
        for layer in range(last):
            h = mm(acts[layer], h, self.W[layer], cdt, self.b[layer]).relu_()
        if cdt == torch.float32:  # diff = (b - x) + h @ W in one matmul pass (no bias copy, no subtraction)
            diff = torch.sub(self.b[last], x, out=acts[last]).baddbmm_(h, self.W[last])
        else:  # the product in low precision, the difference in float32
            diff = mm(acts[last], h, self.W[last], cdt, self.b[last]).sub_(x)
        losses = row_loss(sq_err(diff), self.M, acts[n_encoder - 1], l1)
        if self.trim > 0:
            w_row, w = self.trimmed(losses, w_row)
        # Output layer (linear): dL/dz = diff * w, w = w_row * 2/M per row. Fold w into h (width H < M);
        # h is a ReLU output (zero where the unit is off), so h * w needs no mask.
        h_in = acts[last - 1]
        self._grad(2 * last, torch.mul(h_in, w, out=self.hw).transpose(1, 2), diff, cdt)
        # Output bias: the batch sum of diff * w, written straight into its storage (each model's row
        # starts on a cache line). A 1-row matmul into a packed scratch row rounded differently for a
        # model at another chunk position (seen at 159 metrics), breaking companion independence.
        torch.sum(torch.mul(diff, w, out=self.dw), 1, keepdim=True, out=self.targets[2 * last + 1][0])
        dh = mm(self.d[last], diff, self.WT[last], cdt).mul_(w)
        if l1 > 0 and last == n_encoder:  # the code feeds the output layer directly
            dh.add_((l1 * w_row).unsqueeze(-1))
        dz = _relu_backward(dh, h_in)
        for layer in range(last - 1, -1, -1):
            h_in = x_in if layer == 0 else acts[layer - 1]
            self._grad(2 * layer, h_in.transpose(1, 2), dz, cdt)
            torch.sum(dz, 1, out=self.grads[2 * layer + 1])
            if layer == 0:
                break
            dh = mm(self.d[layer], dz, self.WT[layer], cdt)
            if l1 > 0 and layer == n_encoder:  # the code is the (post-ReLU) output of layer n_encoder - 1
                dh.add_(l1 * torch.sign(h_in) * w_row.unsqueeze(-1))
            dz = _relu_backward(dh, h_in)
        return losses


def _relu_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``grad`` where the ReLU output ``out`` is positive, else 0, in place (one pass, no mask tensor)."""
    return torch.ops.aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)
