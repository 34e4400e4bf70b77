"""Fixed grayscale + Sobel input layer (DeepCluster's default input), and its fold into a conv.

    sobel = Sobel(padding=2)        # [B, 3, H, W] normalised RGB -> [B, 2, H+2, W+2] edge maps

What it computes, exactly:
  gray = 0.299 * x_r + 0.587 * x_g + 0.114 * x_b   on the *normalised* input x (no bias), then
  gx   = cross-correlation of gray with [[1, 0, -1], [2, 0, -2], [1, 0, -1]]   (zero padding)
  gy   = cross-correlation of gray with [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]
Both Sobel kernels sum to zero, so the per-channel mean subtraction of the normalisation has no
effect; the per-channel division by std scales the three gray weights by 1/std_c (equal std, as
for grayscale data replicated to 3 channels, only scales the output). Zero padding of the
normalised input means padding with the dataset mean colour.

Why `padding` is not simply 1: the trunks give the Sobel layer the padding of the first trainable
conv as well (Sobel padding 1 + P, first conv padding 0). Then Sobel followed by the first conv is
*exactly* one conv on RGB with kernel k+2 and padding P+1 (`fold_into_conv`), border included,
which is what makes the exported torchvision weights give the same features as the trunk.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma
SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))
SOBEL_Y = ((1.0, 2.0, 1.0), (0.0, 0.0, 0.0), (-1.0, -2.0, -1.0))


class Sobel(nn.Module):
    """Grayscale (1x1) then the two 3x3 Sobel filters; no trainable parameters, weights are buffers."""

    def __init__(self, padding: int = 1):
        super().__init__()
        self.padding = padding
        # buffers, not parameters: part of the state dict (and moved by .to()), never trained
        self.register_buffer("gray", torch.tensor(GRAY_WEIGHTS).view(1, 3, 1, 1))
        self.register_buffer("edges", torch.tensor((SOBEL_X, SOBEL_Y)).view(2, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Sobel expects [B, 3, H, W] RGB input, got {tuple(x.shape)}")
        gray = F.conv2d(x, self.gray.to(x.dtype))
        return F.conv2d(gray, self.edges.to(x.dtype), padding=self.padding)

    def extra_repr(self) -> str:
        return f"padding={self.padding}"


def rgb_kernel(sobel: Sobel, conv_weight: torch.Tensor) -> torch.Tensor:
    """The [O, 3, kh+2, kw+2] kernel equal to `conv_weight` ([O, 2, kh, kw]) applied after `sobel`.

    Cross-correlations compose by *convolving* their kernels: K[t] = sum_{a+b=t} W[b] S[a], which is
    what conv_transpose2d computes when the conv weight is the input and the Sobel kernels the
    filter; the 1x1 gray weights then spread K over the three input channels.
    """
    if conv_weight.dim() != 4 or conv_weight.shape[1] != 2:
        raise ValueError(f"expected a conv weight over 2 Sobel channels, got {tuple(conv_weight.shape)}")
    weight = conv_weight.detach().double()
    edge_kernel = F.conv_transpose2d(weight, sobel.edges.double())  # [O, 1, kh+2, kw+2]
    full = edge_kernel * sobel.gray.double().view(1, 3, 1, 1)
    return full.to(conv_weight.dtype)


def fold_into_conv(sobel: Sobel, conv: nn.Conv2d) -> nn.Conv2d:
    """One RGB conv equal to conv(sobel(x)) for every input, borders included.

    Exact only when the conv itself has no padding and the Sobel layer carries all of it (the
    layout the trunks use); otherwise the intermediate zero padding differs on the outer ring.
    """
    if conv.padding not in (0, (0, 0)) or conv.groups != 1 or conv.dilation not in (1, (1, 1)):
        raise ValueError("fold_into_conv needs a conv with padding 0, groups 1, dilation 1 "
                         f"(the padding lives in the Sobel layer); got {conv}")
    kh, kw = conv.kernel_size
    pad = sobel.padding
    folded = nn.Conv2d(3, conv.out_channels, (kh + 2, kw + 2), stride=conv.stride, padding=pad,
                       bias=conv.bias is not None)
    with torch.no_grad():
        folded.weight.copy_(rgb_kernel(sobel, conv.weight))
        if conv.bias is not None:
            folded.bias.copy_(conv.bias)
    return folded
