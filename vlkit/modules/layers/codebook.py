"""A vector-quantisation codebook: nearest-code lookup with a straight-through gradient, EMA code updates with
Laplace smoothing (as in VQ-VAE-2), restart of dead codes, and code usage and perplexity for logging.

Each input vector ``z`` is replaced by its nearest code ``e_k`` (squared Euclidean distance). The output is
``z + (e_k - z).detach()``: its value is the code, its gradient flows to ``z`` unchanged (the straight-through
estimator). With ``ema=True`` the codes are buffers moved towards the mean of the vectors assigned to them:

    N_k <- decay * N_k + (1 - decay) * n_k                (n_k: vectors assigned to code k in the batch)
    S_k <- decay * S_k + (1 - decay) * sum of those vectors
    N~_k = (N_k + eps) / (sum_j N_j + K * eps) * sum_j N_j  (Laplace smoothing: no division by zero)
    e_k  = S_k / N~_k

With ``ema=False`` the codes are parameters trained by the codebook loss ``|| sg(z) - e ||^2``. A code no
vector chose for ``restart_after`` training steps in a row is re-initialised from a random input vector of the
batch (its averages restart from that vector with a count of one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class QuantizerOutput:
    """What :class:`Codebook` returns.

    Attributes:
        quantized: the nearest codes, shaped like the input ``[..., dim]``, with the straight-through gradient.
        ids: the chosen code of each vector ``[...]`` (int64).
        commitment_loss: ``mean || z - sg(e) ||^2`` (scalar): pulls the encoder output towards its code.
        codebook_loss: ``mean || sg(z) - e ||^2`` (scalar) without EMA; zero with EMA (the averages move the codes).
        usage: share of the codes chosen at least once in this batch (scalar, detached).
        perplexity: ``exp(entropy)`` of the batch's code histogram (scalar, detached): 1 when one code takes
            everything, ``num_codes`` when all are used equally.
        restarted: codes re-initialised at this step (detached count).
    """

    quantized: Tensor
    ids: Tensor
    commitment_loss: Tensor
    codebook_loss: Tensor
    usage: Tensor
    perplexity: Tensor
    restarted: Tensor


def nearest_codes(z: Tensor, codes: Tensor) -> Tensor:
    """Index of the nearest code (squared Euclidean distance) of each row of ``z``.

    Args:
        z: ``[n, dim]`` vectors.
        codes: ``[num_codes, dim]`` codebook.

    Returns:
        ``[n]`` int64 code ids (the lowest id on ties).
    """
    # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 is the same for every code of a row
    dist = codes.pow(2).sum(1)[None, :] - 2.0 * z @ codes.t()  # [n, num_codes]
    return dist.argmin(dim=1)


def code_statistics(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Usage (share of codes with a non-zero count) and perplexity of a code histogram ``[num_codes]``."""
    counts = counts.float()
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return (counts > 0).float().mean(), entropy.exp()


class Codebook(nn.Module):
    """Nearest-neighbour vector quantisation; see the module docstring.

    Args:
        num_codes: codes in the book (K).
        dim: length of each code.
        ema: update the codes by exponential moving averages (True) or by gradient descent on the codebook loss.
        decay: EMA decay of the counts and sums.
        eps: Laplace smoothing constant of the counts.
        restart_after: training steps a code may go unchosen before it restarts from a random input vector
            (0: never restart).

    Example:
        >>> book = Codebook(16, 4)
        >>> out = book(torch.randn(2, 5, 4))
        >>> out.quantized.shape, out.ids.shape
        (torch.Size([2, 5, 4]), torch.Size([2, 5]))
    """

    def __init__(self, num_codes: int, dim: int, ema: bool = True, decay: float = 0.99, eps: float = 1e-5,
                 restart_after: int = 100):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be positive, got {num_codes} and {dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_codes, self.dim, self.ema = num_codes, dim, ema
        self.decay, self.eps, self.restart_after = decay, eps, restart_after
        init = torch.randn(num_codes, dim) * dim**-0.5
        if ema:
            self.register_buffer("embedding", init)
            self.register_buffer("cluster_size", torch.ones(num_codes))  # N_k, as if each code had seen itself
            self.register_buffer("embed_sum", init.clone())  # S_k
        else:
            self.embedding = nn.Parameter(init)
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.long))

    def lookup(self, ids: Tensor) -> Tensor:
        """The codes of ``ids`` ``[...]`` -> ``[..., dim]``."""
        return F.embedding(ids, self.embedding)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise ``z`` ``[..., dim]``; in training mode also update the codes (EMA) and restart dead ones."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected vectors of length {self.dim}, got shape {tuple(z.shape)}")
        flat = z.reshape(-1, self.dim).float()  # [n, dim]
        with torch.no_grad():
            ids = nearest_codes(flat, self.embedding.float())  # [n]
            counts = torch.bincount(ids, minlength=self.num_codes).float()  # [num_codes]
        restarted = torch.zeros((), device=z.device)
        if self.training:
            with torch.no_grad():
                if self.ema:
                    self._ema_update(flat, ids, counts)
                restarted = self._restart_dead(flat, counts)
        codes = self.lookup(ids).view_as(z)
        quant_target = codes.detach().to(z.dtype)
        commitment = F.mse_loss(z, quant_target)
        codebook_loss = torch.zeros((), device=z.device) if self.ema else F.mse_loss(codes, z.detach())
        quantized = z + (quant_target - z).detach()  # value of the code, gradient of the identity
        usage, perplexity = code_statistics(counts)
        return QuantizerOutput(quantized, ids.view(z.shape[:-1]), commitment, codebook_loss, usage, perplexity,
                               restarted)

    def _ema_update(self, flat: Tensor, ids: Tensor, counts: Tensor) -> None:
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device).index_add_(0, ids, flat)  # [K, dim]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # every rank moves its codes by the whole batch
            torch.distributed.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.embedding.copy_(self.embed_sum / smoothed[:, None])

    def _restart_dead(self, flat: Tensor, counts: Tensor) -> Tensor:
        used = counts > 0
        self.unused_steps.add_(1).masked_fill_(used, 0)
        if self.restart_after <= 0:
            return torch.zeros((), device=flat.device)
        dead = (self.unused_steps >= self.restart_after).nonzero().flatten()
        if dead.numel() == 0:
            return torch.zeros((), device=flat.device)
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        fresh = flat[pick].to(self.embedding.dtype)  # [dead, dim]
        data = self.embedding.data if isinstance(self.embedding, nn.Parameter) else self.embedding
        data[dead] = fresh
        if self.ema:
            self.cluster_size[dead] = 1.0
            self.embed_sum[dead] = fresh
        self.unused_steps[dead] = 0
        return torch.tensor(float(dead.numel()), device=flat.device)
