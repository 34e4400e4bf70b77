"""VGG-16-BN and ResNet-50 trunks built from torchvision's own definitions (weights=None).

    trunk = VGG16BN(sobel=True)     # [B, 3, H, W] -> [B, 4096], H, W >= 32
    trunk = ResNet50(sobel=False)   # [B, 3, H, W] -> [B, 2048]

Module names are torchvision's (features.*, classifier.0, classifier.3; conv1, bn1, layer1..4), so
the exported state dict loads into torchvision with only the final classifier layer missing.
With Sobel, the first conv takes the 2 Sobel channels and its padding moves into the Sobel layer
(see sobel.py): Sobel + first conv then equals one RGB conv with a kernel 2 larger, exactly.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from dist_cluster.models.sobel import Sobel


def _sobel_first_conv(old: nn.Conv2d) -> tuple[Sobel, nn.Conv2d]:
    """The Sobel layer and a 2-channel replacement of `old`, padding moved into the Sobel layer."""
    pad = old.padding[0]
    conv = nn.Conv2d(2, old.out_channels, old.kernel_size, stride=old.stride, padding=0,
                     bias=old.bias is not None)
    # torchvision initialises both first convs this way
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return Sobel(padding=1 + pad), conv


class VGG16BN(nn.Module):
    """torchvision vgg16_bn without its last Linear and last ReLU: output = classifier[3], pre-ReLU.

    Dropout stays where torchvision (and the DeepCluster trunk) has it, before the second Linear.
    """

    arch = "vgg16_bn"
    feature_dim = 4096
    min_size = 32  # five 2x2 max pools
    block_names = ["conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"]

    def __init__(self, sobel: bool = True):
        super().__init__()
        net = torchvision.models.vgg16_bn(weights=None)
        self.sobel = None
        if sobel:
            self.sobel, net.features[0] = _sobel_first_conv(net.features[0])
        self.features = net.features
        self.avgpool = net.avgpool
        self.classifier = net.classifier[:4]  # Linear, ReLU, Dropout, Linear (keys 0..3 kept)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.sobel(x) if self.sobel is not None else x

    def forward_blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Last conv-BN-ReLU output of each of the 5 stages (before its pool), for per-layer probes."""
        outs, x = [], self._stem(x)
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                outs.append(x)
            x = layer(x)
        return outs

    def forward_with_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(forward(x), forward_blocks(x)) in one pass: the evaluation's per-layer probes."""
        outs, x = [], self._stem(x)
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                outs.append(x)
            x = layer(x)
        return self.classifier(torch.flatten(self.avgpool(x), 1)), outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(self._stem(x)))
        return self.classifier(torch.flatten(x, 1))


class ResNet50(nn.Module):
    """torchvision resnet50 without fc: output = global average pool of layer4, 2048-d.

    Unlike the VGG trunks this feature is post-ReLU by construction (every bottleneck ends with a
    ReLU after the residual sum), so the heads' ReLU is a no-op here and the clustering sees
    non-negative features; the paper's choice of pre-ReLU features has no equivalent in ResNet.
    """

    arch = "resnet50"
    feature_dim = 2048
    min_size = 32  # total stride 32
    block_names = ["layer1", "layer2", "layer3", "layer4"]

    def __init__(self, sobel: bool = True):
        super().__init__()
        net = torchvision.models.resnet50(weights=None)
        self.sobel = None
        if sobel:
            self.sobel, net.conv1 = _sobel_first_conv(net.conv1)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.avgpool = net.avgpool

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sobel(x) if self.sobel is not None else x
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of layer1..layer4, for per-layer probes."""
        outs, x = [], self._stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            outs.append(x)
        return outs

    def forward_with_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(forward(x), forward_blocks(x)) in one pass: the evaluation's per-layer probes."""
        blocks = self.forward_blocks(x)
        return torch.flatten(self.avgpool(blocks[-1]), 1), blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_blocks(x)[-1]), 1)
