"""The two corpus architectures no installed package provides: a YOLO-style detector and a UNet.

Both follow their published designs layer for layer, at standard sizes, so the exported graphs
have the shapes, skip connections and workspace needs of the real thing.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn


def _conv(c_in: int, c_out: int, k: int = 1, s: int = 1, p: int | None = None) -> nn.Sequential:
    """Conv-BN-SiLU, YOLOv5's basic block (BatchNorm folds into the Conv on export)."""
    pad = k // 2 if p is None else p
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, pad, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class _Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = _conv(c, c, 1), _conv(c, c, 3), shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class _C3(nn.Module):
    """CSP bottleneck with three convolutions: half the channels go through the bottlenecks."""

    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool = True) -> None:
        super().__init__()
        c = c_out // 2
        self.cv1, self.cv2, self.cv3 = _conv(c_in, c), _conv(c_in, c), _conv(2 * c, c_out)
        self.m = nn.Sequential(*(_Bottleneck(c, shortcut) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class _SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max pools, concatenated."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        c = c_in // 2
        self.cv1, self.cv2 = _conv(c_in, c), _conv(4 * c, c_out)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat((x, y1, y2, self.pool(y2)), 1))


# YOLOv5's default anchors (pixels) for strides 8, 16, 32.
_ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))


class YoloStyle(nn.Module):
    """YOLOv5s (depth 0.33, width 0.5): CSP backbone, SPPF, PAN neck, three-scale head.

    The head decodes boxes (sigmoid, grid offsets, anchors) into one [batch, 25200, 85] tensor at
    640x640, as YOLOv5's exported models do; non-maximum suppression is left to the caller, so
    every shape is static.
    """

    def __init__(self, classes: int = 80) -> None:
        super().__init__()
        self.outputs = classes + 5
        self.b0 = nn.Sequential(_conv(3, 32, 6, 2, 2), _conv(32, 64, 3, 2), _C3(64, 64, 1),
                                _conv(64, 128, 3, 2), _C3(128, 128, 2))                  # P3, stride 8
        self.b1 = nn.Sequential(_conv(128, 256, 3, 2), _C3(256, 256, 3))                 # P4, stride 16
        self.b2 = nn.Sequential(_conv(256, 512, 3, 2), _C3(512, 512, 1), _SPPF(512, 512))  # P5, stride 32
        self.lat5, self.top4 = _conv(512, 256), _C3(512, 256, 1, False)
        self.lat4, self.out3 = _conv(256, 128), _C3(256, 128, 1, False)
        self.down3, self.out4 = _conv(128, 128, 3, 2), _C3(256, 256, 1, False)
        self.down4, self.out5 = _conv(256, 256, 3, 2), _C3(512, 512, 1, False)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.heads = nn.ModuleList(nn.Conv2d(c, 3 * self.outputs, 1) for c in (128, 256, 512))
        self.register_buffer("anchors", torch.tensor(_ANCHORS, dtype=torch.float32).view(3, 1, 3, 1, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b0(x)
        p4 = self.b1(p3)
        p5 = self.b2(p4)
        h5 = self.lat5(p5)
        t4 = self.top4(torch.cat((self.up(h5), p4), 1))
        h4 = self.lat4(t4)
        o3 = self.out3(torch.cat((self.up(h4), p3), 1))
        o4 = self.out4(torch.cat((self.down3(o3), h4), 1))
        o5 = self.out5(torch.cat((self.down4(o4), h5), 1))
        levels = enumerate(zip(self.heads, (o3, o4, o5), strict=True))
        boxes = [self._decode(i, head(o), 8 * 2**i) for i, (head, o) in levels]
        return torch.cat(boxes, 1)

    def _decode(self, level: int, raw: torch.Tensor, stride: int) -> torch.Tensor:
        b, _, h, w = raw.shape
        y = raw.view(b, 3, self.outputs, h, w).permute(0, 1, 3, 4, 2).sigmoid()
        gy, gx = torch.meshgrid(torch.arange(h, dtype=y.dtype), torch.arange(w, dtype=y.dtype), indexing="ij")
        grid = torch.stack((gx, gy), 2).view(1, 1, h, w, 2) - 0.5
        xy = (y[..., :2] * 2 + grid) * stride
        wh = (y[..., 2:4] * 2) ** 2 * self.anchors[level]
        return torch.cat((xy, wh, y[..., 4:]), -1).reshape(b, -1, self.outputs)


class _DoubleConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class UNet(nn.Module):
    """Ronneberger et al.'s UNet with padded convolutions: four down and four up levels,
    64 to 1024 channels, transposed-convolution upsampling, 31 M parameters."""

    def __init__(self, channels: int = 3, classes: int = 2, width: int = 64) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(5)]  # 64, 128, 256, 512, 1024
        self.inc = _DoubleConv(channels, widths[0])
        self.downs = nn.ModuleList(_DoubleConv(a, b) for a, b in pairwise(widths))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in pairwise(widths))
        self.merges = nn.ModuleList(_DoubleConv(b, a) for a, b in pairwise(widths))
        self.outc = nn.Conv2d(widths[0], classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(self.pool(skips[-1])))
        y = skips.pop()
        for up, merge in zip(reversed(self.ups), reversed(self.merges), strict=True):
            y = merge(torch.cat((skips.pop(), up(y)), 1))
        return self.outc(y)
