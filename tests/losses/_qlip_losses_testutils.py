"""Tiny towers shared by the loss tests (not a test module)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinyImageTower(nn.Module):
    """conv -> pool -> linear embedding (normalised), plus a linear 'decoder' for a recon loss."""

    def __init__(self, dim=8, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(4 * 4 * 4, dim)
        self.dec = nn.Linear(4 * 4 * 4, 3 * 8 * 8)

    def features(self, x):
        h = F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 4).flatten(1)
        return self.drop(h)

    def forward(self, x):
        return F.normalize(self.proj(self.features(x)), dim=-1)

    def with_recon(self, x):
        h = self.features(x)
        emb = F.normalize(self.proj(h), dim=-1)
        recon = self.dec(h).view_as(x)
        return emb, F.mse_loss(recon, x)


class TinyTextTower(nn.Module):
    def __init__(self, vocab=20, dim=8, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, 6)
        self.drop = nn.Dropout(dropout)
        self.mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, dim))

    def forward(self, t):
        return F.normalize(self.mlp(self.drop(self.emb(t).mean(1))), dim=-1)


class TinyCLIP(nn.Module):
    def __init__(self, dim=8, dropout=0.0):
        super().__init__()
        self.visual = TinyImageTower(dim, dropout)
        self.text = TinyTextTower(dim=dim, dropout=dropout)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))


def make_batch(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=g, dtype=dtype)
    texts = torch.randint(0, 20, (n, 5), generator=g)
    return images, texts


def grads(module):
    return {k: (p.grad.clone() if p.grad is not None else None) for k, p in module.named_parameters()}


def assert_grads_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None and b[k] is None:  # parameter unused by both computations
            continue
        assert a[k] is not None and b[k] is not None, k
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
