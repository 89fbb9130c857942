"""Train a projection head so that photos of the same product come closer (the research's next step).

The backbone stays frozen: its L2-normalised features of the catalogue's reference photos are
computed once, and a linear map is trained on them with a normalised-softmax (proxy) loss: each
product has a learnable proxy vector, and every reference is pulled towards its product's proxy
and pushed from the others, on the unit sphere with a temperature. Minutes on a CPU, no GPU needed.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from catalog.models import ProjectionHead


def train_head(
    features: np.ndarray, labels: np.ndarray, *, out_dim: int = 256, epochs: int = 60, batch_size: int = 256,
    lr: float = 2e-3, weight_decay: float = 1e-4, scale: float = 16.0, seed: int = 0,
) -> ProjectionHead:
    """Fit a :class:`ProjectionHead` on unit backbone features (N, D) with product labels (N,)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        head = ProjectionHead(x.shape[1], out_dim)
        proxies = torch.nn.Parameter(torch.randn(int(y.max()) + 1, out_dim) * 0.01)
        optimiser = torch.optim.AdamW([*head.parameters(), proxies], lr=lr, weight_decay=weight_decay)
        steps = epochs * max(1, (len(x) + batch_size - 1) // batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
        head.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                idx = order[start : start + batch_size]
                z = F.normalize(head(x[idx]), dim=1)
                logits = scale * z @ F.normalize(proxies, dim=1).T
                loss = F.cross_entropy(logits, y[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
    head.proxies = F.normalize(proxies.detach(), dim=1)
    return head.eval()


def with_views(features: np.ndarray, labels: np.ndarray, views: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Training set of the head: the reference features, then each set of views (one view per
    reference, in reference order, as :func:`catalog.build.embed_images` gives them), with labels."""
    x = np.concatenate([features, *views]) if views else features
    return x, np.tile(np.asarray(labels), 1 + len(views))


def project(head: ProjectionHead, features: np.ndarray) -> np.ndarray:
    """Unit vectors in the head's space for unit backbone features (as the embedder computes them)."""
    with torch.inference_mode():
        z = head(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        return F.normalize(z, dim=1).numpy()
