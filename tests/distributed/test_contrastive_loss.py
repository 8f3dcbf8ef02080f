"""The contrastive loss on 2 ranks (open_clip gather with grad) equals the single-process loss on the
concatenated batch, and so do the gradients (fp64, <= 1e-6)."""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers.harness import run_ranks

B, DIM = 4, 16  # per-rank batch, embedding width


def _check(rank, world_size, kind):
    import torch.distributed as dist

    from moe_dist.models.loss import ContrastiveLoss, ModelOutput
    from moe_dist.models.moe_blocks import MoEAux

    gen = torch.Generator().manual_seed(0)  # the same global batch on every rank
    images = F.normalize(torch.randn(B * world_size, DIM, generator=gen, dtype=torch.float64), dim=-1)
    texts = F.normalize(images + 0.5 * torch.randn(B * world_size, DIM, generator=gen, dtype=torch.float64), dim=-1)
    rows = slice(rank * B, (rank + 1) * B)

    def run(img, txt, rank_, world_):
        img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
        scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
        out = ModelOutput(img, txt, scale.exp(), bias if kind == "siglip" else None,
                          MoEAux(torch.zeros((), dtype=torch.float64)))
        loss = ContrastiveLoss(kind, rank_, world_)(out).total
        loss.backward()
        return loss.detach(), img.grad, txt.grad, scale.grad, bias.grad

    loss, g_img, g_txt, g_scale, g_bias = run(images[rows], texts[rows], rank, world_size)
    ref_loss, r_img, r_txt, r_scale, r_bias = run(images, texts, 0, 1)

    mean_loss = loss.clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world_size
    scalars = torch.stack([g_scale] + ([g_bias] if kind == "siglip" else []))
    dist.all_reduce(scalars)
    scalars /= world_size
    errors = {
        "loss": float((mean_loss - ref_loss).abs()),
        # each rank's feature grads collect every rank's loss (gather with grad): W x d(mean loss)
        "grad_image": float((g_img / world_size - r_img[rows]).abs().max()),
        "grad_text": float((g_txt / world_size - r_txt[rows]).abs().max()),
        "grad_logit_scale": float((scalars[0] - r_scale).abs()),
    }
    if kind == "siglip":
        errors["grad_logit_bias"] = float((scalars[1] - r_bias).abs())
    return {name: err for name, err in errors.items() if err > 1e-6}


@pytest.mark.world_size(2)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_distributed_loss_matches_single_process(kind):
    assert run_ranks(_check, world_size=2, args=(kind,)) == [{}, {}]
