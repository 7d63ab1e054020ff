"""MaskedAdamW's multi-tensor step, for GPUs: the same update as allo.MaskedAdamW, the same bits.

On a GPU the per-tensor loop of allo.MaskedAdamW is bound by kernel launches (about 10 a tensor).
This step gathers the selected entries of each partially masked parameter (torch.take), runs the
AdamW arithmetic as torch._foreach_* ops over a bucket of tensors at once, and scatters the
weights back (put_). The ops are elementwise the same, in the same order, as the per-tensor loop,
so the results are bit-identical (tests/test_allo.py); docs/benchmarks.md counts the ops.
trainer.fit uses it on CUDA.
"""

import torch

from allo import MaskedAdamW


def _factor(x):
    """A Python number as the 0-dim float64 CPU tensor that torch._foreach_mul_ should multiply by.
    On CPU, _foreach_mul_(tensors, number) rounds the number to the tensors' dtype first (bf16:
    0.99 -> 0.98828125), Tensor.mul_(number) does not; with a 0-dim tensor both multiply in float."""
    return torch.scalar_tensor(x, dtype=torch.float64, device="cpu")


class MultiTensorMaskedAdamW(MaskedAdamW):
    """allo.MaskedAdamW with a multi-tensor step. A bucket holds at most as many entries as the
    group's largest parameter, so the step's temporaries are at most those of the per-tensor loop
    on the largest parameter."""

    def update(self, params, group):
        """One AdamW step of the selected entries of `params`, a bucket of them at a time."""
        largest = max((p.numel() for p in group["params"]), default=0)
        for bucket in self._buckets(params, largest):
            self._update(bucket, group)

    def _buckets(self, params, max_entries):
        """`params` cut into consecutive runs of at most `max_entries` updated entries each."""
        buckets, entries = [], max_entries
        for p in params:
            n = self.state[p]["exp_avg"].numel()  # selected entries (all of p for a full mask)
            if entries + n > max_entries:
                buckets.append([])
                entries = 0
            buckets[-1].append(p)
            entries += n
        return buckets

    def _update(self, params, group):
        """One AdamW step of the selected entries of `params` (each has .grad and state)."""
        lr, (beta1, beta2), eps, wd = (group[k] for k in ("lr", "betas", "eps", "weight_decay"))
        bias_correction1 = 1 - beta1 ** group["step"]
        bias_correction2_sqrt = (1 - beta2 ** group["step"]) ** 0.5
        partial = [p for p in params if "idx" in self.state[p]]
        full = [p for p in params if "idx" not in self.state[p]]
        idx, grads, thetas = [], [], []
        if partial:
            # int32 at rest (compact state), int64 for take/put_: one cast for the whole bucket
            sizes = [self.state[p]["idx"].numel() for p in partial]
            idx = torch.cat([self.state[p]["idx"] for p in partial]).long().split(sizes)
            for p, i in zip(partial, idx):  # torch.take reads p as if it were 1-D
                grads.append(torch.take(p.grad, i))  # [n_sel] gathered gradient
                thetas.append(torch.take(p, i))  # [n_sel] gathered weights
        ordered = partial + full
        grads += [p.grad for p in full]
        thetas += full  # full mask: the parameter is updated in place
        exp_avgs = [self.state[p]["exp_avg"] for p in ordered]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in ordered]
        decayed = [theta for theta, p in zip(thetas, ordered) if p.dim() >= 2]
        if wd != 0 and decayed:
            torch._foreach_mul_(decayed, _factor(1 - lr * wd))
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, _factor(beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)  # one temporary a tensor, divided in place as the loop
        torch._foreach_div_(denoms, bias_correction2_sqrt)
        torch._foreach_add_(denoms, eps)
        torch._foreach_addcdiv_(thetas, exp_avgs, denoms, value=-lr / bias_correction1)
        for p, i, theta in zip(partial, idx, thetas):
            p.put_(i, theta)  # scatter back: only the selected entries are written


def masked_adamw(named_parameters, masks, device, **hyper):
    """The MaskedAdamW for `device`: the multi-tensor step on CUDA, the per-tensor loop elsewhere
    (on a CPU an op costs little to launch, and the loop is the faster)."""
    kind = MultiTensorMaskedAdamW if device.type == "cuda" else MaskedAdamW
    return kind(named_parameters, masks, **hyper)
