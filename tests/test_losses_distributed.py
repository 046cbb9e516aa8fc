"""Distributed contrastive loss: 2 gloo ranks on CPU reproduce single-process loss and gradients.

Each rank embeds half of a fixed global batch with the same small linear projections, computes the
distributed loss, backpropagates and averages the parameter gradients over ranks (as DDP does).
The parent compares with one process on the whole batch. One case also runs under real
``DistributedDataParallel``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from vlkit.modules.losses import (
    ContrastiveLoss,
    DistributedContrastiveLoss,
    FeatureQueue,
    gather_no_grad,
    gather_with_grad,
)

WORLD = 2
BATCH = 8  # global
GROUPS = [0, 0, 1, 2, 2, 3, 0, 5]  # rank 0: [0, 0, 1, 2], rank 1: [2, 3, 0, 5]; ids 0 and 2 span both ranks
CASES = {
    "global": dict(local_loss=False, groups=False, smoothing=0.0),
    "local": dict(local_loss=True, groups=False, smoothing=0.0),
    "global_groups": dict(local_loss=False, groups=True, smoothing=0.0),
    "local_groups": dict(local_loss=True, groups=True, smoothing=0.0),
    "local_groups_smoothing": dict(local_loss=True, groups=True, smoothing=0.1),
}


class Pair(nn.Module):
    """Two projections and a loss: the smallest two-tower model."""

    def __init__(self, loss: ContrastiveLoss):
        super().__init__()
        torch.manual_seed(0)  # same initial weights on every rank and in the parent
        self.image_proj = nn.Linear(6, 4).double()
        self.text_proj = nn.Linear(5, 4).double()
        self.loss = loss.double()

    def forward(self, images, texts, group_ids=None):
        img = F.normalize(self.image_proj(images), dim=-1)  # [n, 4]
        txt = F.normalize(self.text_proj(texts), dim=-1)  # [n, 4]
        return self.loss(img, txt, group_ids)


def global_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 6, generator=g, dtype=torch.float64)
    texts = torch.randn(BATCH, 5, generator=g, dtype=torch.float64)
    return images, texts, torch.tensor(GROUPS)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _run_case(rank: int, local_loss: bool, groups: bool, smoothing: float, ddp: bool = False):
    images, texts, group_ids = global_batch()
    rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    model = Pair(DistributedContrastiveLoss(local_loss=local_loss, label_smoothing=smoothing))
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    out = net(images[rows], texts[rows], group_ids[rows] if groups else None)
    out.loss.backward()
    if not ddp:  # what DDP does: average every parameter's gradient over the ranks
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
    mean_loss = out.loss.detach().clone()
    dist.all_reduce(mean_loss)
    return {"loss": mean_loss / WORLD, "rank_loss": out.loss.detach(), "grads": grads(model)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {name: _run_case(rank, **case) for name, case in CASES.items()}
        results["ddp_local_groups"] = _run_case(rank, local_loss=True, groups=True, smoothing=0.0, ddp=True)
        results["ddp_global"] = _run_case(rank, local_loss=False, groups=False, smoothing=0.0, ddp=True)

        # gather_with_grad: rank r's loss weights everything by (r + 1); the backward sums over ranks.
        x = torch.full((2, 3), float(rank), dtype=torch.float64, requires_grad=True)
        y = gather_with_grad(x)
        (y * (rank + 1)).sum().backward()
        results["gather"] = {"y": y.detach(), "grad": x.grad}
        results["gather_no_grad"] = gather_no_grad(torch.tensor([rank, 10 + rank]))

        # a queue fed by both ranks holds both ranks' rows, in rank order, on every rank
        queue = FeatureQueue(dim=2, size=5)
        for step in range(3):
            queue.enqueue(torch.full((2, 2), float(10 * step + rank)))
        results["queue"] = queue.chronological()[:, 0]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears down while the other still talks to it (gloo aborts otherwise)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference(groups: bool, smoothing: float):
    images, texts, group_ids = global_batch()
    model = Pair(ContrastiveLoss(label_smoothing=smoothing))
    out = model(images, texts, group_ids if groups else None)
    out.loss.backward()
    return out.loss.detach(), grads(model)


def assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        rel = (got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-30)
        assert rel < 1e-6, f"{name}: relative gradient error {rel:.3g}"
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-10)


def test_two_rank_gloo_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    r0 = results[0]

    for name, case in CASES.items():
        loss, want = reference(case["groups"], case["smoothing"])
        assert abs(r0[name]["loss"].item() - loss.item()) < 1e-6, name
        assert_grads_close(r0[name]["grads"], want)
        assert set(want) >= {"loss.logit_scale", "image_proj.weight", "text_proj.bias"}
        if case["local_loss"]:  # a rank's own share differs; only the mean over ranks is global
            assert abs(r0[name]["rank_loss"].item() - loss.item()) > 1e-6, name
        else:
            assert abs(r0[name]["rank_loss"].item() - loss.item()) < 1e-6, name
        # after averaging, both ranks hold the same gradients (as DDP guarantees)
        assert_grads_close(results[1][name]["grads"], want)

    for name, groups in [("ddp_local_groups", True), ("ddp_global", False)]:
        loss, want = reference(groups, 0.0)
        assert abs(r0[name]["loss"].item() - loss.item()) < 1e-6, name
        assert_grads_close(r0[name]["grads"], want)

    for rank, res in enumerate(results):
        torch.testing.assert_close(res["gather"]["y"][:, 0], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
        torch.testing.assert_close(res["gather"]["grad"], torch.full((2, 3), 3.0, dtype=torch.float64))  # 1 + 2
        assert res["gather_no_grad"].tolist() == [0, 10, 1, 11]
        # 3 steps x 2 ranks x 2 rows = 12 rows through a 5-row queue: the newest 5, rank 0 before rank 1
        assert res["queue"].tolist() == [11.0, 20.0, 20.0, 21.0, 21.0]
