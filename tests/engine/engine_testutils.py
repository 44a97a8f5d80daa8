"""A tiny detector, an in-memory synthetic detection dataset and config helpers for the
engine tests (fast on one CPU thread)."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from yolo_q.config import load_config
from yolo_q.losses.loss import DetectionLoss

NC = 2
IMG = 64


def conv_bn(c1, c2, s):
    return nn.Sequential(nn.Conv2d(c1, c2, 3, s, 1, bias=False), nn.BatchNorm2d(c2), nn.ReLU())


class TinyDetector(nn.Module):
    """Strides 8/16/32 with the train-mode output contract ``(feats, cls (B,N,nc), reg (B,N,4))``.
    A dropout layer makes the global RNG matter (resume tests)."""

    def __init__(self, nc: int = NC, dropout: float = 0.1):
        super().__init__()
        self.nc = nc
        self.stem = nn.Sequential(conv_bn(3, 8, 2), conv_bn(8, 8, 2), conv_bn(8, 12, 2))
        self.down = nn.ModuleList([conv_bn(12, 12, 2), conv_bn(12, 16, 2)])
        self.drop = nn.Dropout(dropout)
        self.cls = nn.ModuleList(nn.Conv2d(c, nc, 1) for c in (12, 12, 16))
        self.reg = nn.ModuleList(nn.Conv2d(c, 4, 1) for c in (12, 12, 16))
        for conv in self.reg:
            nn.init.constant_(conv.bias, 1.0)

    def forward(self, x):
        p3 = self.stem(x)
        p4 = self.down[0](p3)
        p5 = self.down[1](p4)
        feats = [self.drop(p) for p in (p3, p4, p5)]
        cls = torch.cat([h(f).flatten(2) for h, f in zip(self.cls, feats)], 2).permute(0, 2, 1)
        reg = torch.cat([h(f).flatten(2) for h, f in zip(self.reg, feats)], 2).permute(0, 2, 1)
        return feats, cls, reg.abs()


class SyntheticBoxes(Dataset):
    """Random uint8 images with one or two bright boxes each; deterministic per index."""

    def __init__(self, n: int = 16, size: int = IMG, nc: int = NC, seed: int = 0):
        self.n, self.size, self.nc, self.seed = n, size, nc, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 10_000 + i)
        img = torch.randint(0, 60, (3, self.size, self.size), generator=g, dtype=torch.uint8)
        labels = []
        for _ in range(1 + i % 2):
            x1, y1 = torch.randint(0, self.size - 24, (2,), generator=g).tolist()
            w, h = torch.randint(12, 24, (2,), generator=g).tolist()
            c = int(torch.randint(0, self.nc, (1,), generator=g))
            img[:, y1:y1 + h, x1:x1 + w] = 200 + 20 * c
            labels.append([c, x1, y1, x1 + w, y1 + h])
        return img, torch.tensor(labels, dtype=torch.float32), f"img{i}.png", \
            ((self.size, self.size), ((1.0, 1.0), (0.0, 0.0)))


def collate(batch):
    imgs, labels, paths, shapes = zip(*batch)
    targets = [torch.cat([torch.full((len(l), 1), float(i)), l], 1) for i, l in enumerate(labels)]
    return torch.stack(imgs), torch.cat(targets), list(paths), list(shapes)


def make_loader(n: int = 16, batch_size: int = 4, seed: int = 0, sampler=None) -> DataLoader:
    """Shuffled loader; its generator is re-seeded per epoch by the trainer."""
    return DataLoader(SyntheticBoxes(n), batch_size=batch_size, shuffle=sampler is None,
                      sampler=sampler, collate_fn=collate, generator=torch.Generator(),
                      drop_last=True)


def make_cfg(overrides: Optional[List[str]] = None, **train):
    """Schema defaults + small-run settings; ``train`` kwargs override ``train.*``."""
    base = {"model.nc": NC, "train.epochs": 3, "train.batch_size": 4, "train.nominal_batch": 4,
            "train.warmup_epochs": 1, "train.warmup_min_iters": 0, "train.lr0": 0.01,
            "train.device": "cpu", "train.progress_bar": False, "train.tensorboard": False,
            "train.eval_interval": 1}
    base.update({f"train.{k}": v for k, v in train.items()})
    ov = [f"{k}={v}" for k, v in base.items()] + list(overrides or [])
    return load_config(None, ov)


def detection_loss():
    return DetectionLoss(nc=NC, strides=(8, 16, 32), use_dfl=False)


def weights(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
