"""Reference (pure PyTorch) AdamW with per-slot step counts: the math of ``spiel.ops.adamw_step_``, one tensor
at a time in fp32 (float64 tensors in float64). Temporaries: fp32 copies of one tensor."""
import torch

from ..._dispatch import register_kernel
from ...adamw import adamw_step_limit, bump_host_counts, is_host_count


@register_kernel("adamw_step", "torch")
@torch.no_grad()
def adamw_step(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, maximize) -> None:
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        if p.numel() == 0:
            if is_host_count(s):  # a per-tensor count advances for every tensor (torch's AdamW counts them all)
                bump_host_counts([s])
            continue
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        limit = adamw_step_limit(s.dtype)
        g32 = g.to(acc)
        if maximize:
            g32 = -g32
        p32 = p.to(acc)
        m32 = m.to(acc)
        v32 = v.to(acc)
        t = s.to(acc).clamp_max_(limit - 1).add_(1.0)
        if weight_decay != 0.0:
            p32.mul_(1.0 - lr * weight_decay)
        m32.lerp_(g32, 1.0 - beta1)
        v32.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
        if lr != 0.0:
            bias1 = 1.0 - torch.pow(beta1, t)
            bias2 = 1.0 - torch.pow(beta2, t)
            denom = v32.sqrt().div_(bias2.sqrt_()).add_(eps)
            p32.addcdiv_(m32, denom.mul_(bias1), value=-lr)
        p.copy_(p32)
        m.copy_(m32)
        v.copy_(v32)
        s.copy_(t)
