"""HAN: the Harmonious Attention Network (Li, Zhu, Gong) in PyTorch, Small/Medium/Large.

Choices where the paper is silent or ambiguous (each checked against Table 1, see ``profile``):

* **Building block unit** = 1x1 conv then 3x3 depthwise conv, BN+ReLU after each, the unit's
  stride on the depthwise conv. Only this reading (with a 32-filter 3x3 stride-2 stem and the
  paper's "FLOPs" being 2 x multiply-adds) reproduces Table 1: we count 3.71e8 / 5.40e8 /
  7.09e8 FLOPs against the paper's 3.68e8 / 5.33e8 / 7.01e8 (within 1.3%).
* **Strides**: every global block has 3 units with strides (s1, s2, s3) from Table 1, so each
  block halves the resolution once; Small downsamples first (cheapest), Large last.
* **Soft attention**: spatial = channel mean -> 3x3/2 conv -> bilinear resize -> 1x1 scale
  conv; channel = squeeze -> 1x1 (c/16) -> 1x1 (c), ReLU after each (Eq. 6); their product is
  fused by a 1x1 conv + BN + ReLU and a sigmoid, so the attention lies in [0.5, 1).
* **Hard attention**: an FC on the channel squeeze (Eq. 5) predicts (tx, ty) per region, tanh
  keeps them in [-1, 1]; the region scale is fixed at full width x quarter height (horizontal
  stripes, initialised at the four body quarters). The crop is a fixed base grid scaled and
  shifted by the translations, sampled with ``F.grid_sample`` — no ``affine_grid``, which
  TensorRT's ONNX parser lacks. The T region grids are stacked along the grid's height, so one
  ``grid_sample`` per level reads the feature map once (no T-fold copy of the map).
* **Local branch** (as in the authors' HA-CNN): the level-l crop is taken from the input of
  global block l (the stem output for l=1, the attended output of block l-1 after), resampled to
  24x28, 12x14 and 6x7; one unit per level with stride 2, weights shared by the T streams (run
  as one batch of N*T). Cross-attention interaction (Eq. 8): the level-l local feature is added
  to the level-(l+1) crop, so the local loss reaches the global branch.
* **Heads**: FC + BN + ReLU to 512-D for the global branch and for the concatenated pooled
  local streams; identity classifiers exist only in training and are never exported.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from han_edge.config import HANConfig, get_config
from han_edge.errors import HanEdgeError


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Unit(nn.Sequential):
    """Depthwise-separable building block unit (Fig. 4c): 1x1 conv, then 3x3 depthwise with the stride."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(ConvBNReLU(cin, cout, 1), ConvBNReLU(cout, cout, 3, stride, groups=cout))


class GlobalBlock(nn.Sequential):
    """Three units; the first changes the width, the strides come from Table 1."""

    def __init__(self, cin: int, cout: int, strides: tuple[int, int, int]):
        super().__init__(*[Unit(cin if i == 0 else cout, cout, s) for i, s in enumerate(strides)])


class SoftAttention(nn.Module):
    """Spatial x channel attention fused into one map in [0.5, 1) (Fig. 2a-c, Eq. 3-6)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.spatial_conv = ConvBNReLU(1, 1, 3, stride=2)
        self.spatial_scale = ConvBNReLU(1, 1, 1)
        self.channel_squeeze = ConvBNReLU(channels, channels // reduction, 1)
        self.channel_excite = ConvBNReLU(channels // reduction, channels, 1)
        self.fuse = ConvBNReLU(channels, channels, 1)

    def forward(self, x: torch.Tensor, squeezed: torch.Tensor) -> torch.Tensor:
        spatial = self.spatial_conv(x.mean(dim=1, keepdim=True))
        spatial = F.interpolate(spatial, size=x.shape[-2:], mode="bilinear", align_corners=False)
        spatial = self.spatial_scale(spatial)
        channel = self.channel_excite(self.channel_squeeze(squeezed))
        return torch.sigmoid(self.fuse(spatial * channel))


class HardAttention(nn.Module):
    """Predicts T region translations (tx, ty) in [-1, 1] from the channel squeeze (Fig. 2d, Eq. 7)."""

    def __init__(self, channels: int, regions: int):
        super().__init__()
        self.regions = regions
        self.fc = nn.Linear(channels, 2 * regions)
        # Start at the T horizontal body stripes: tx = 0, ty at the stripe centres.
        centres = [(2 * k + 1) / regions - 1 for k in range(regions)]
        bias = torch.tensor([[0.0, math.atanh(c)] for c in centres]).flatten()
        nn.init.zeros_(self.fc.weight)
        with torch.no_grad():
            self.fc.bias.copy_(bias)

    def forward(self, squeezed: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(squeezed.flatten(1))).view(-1, self.regions, 2)


class HarmoniousAttention(nn.Module):
    """One HA module: soft attention for the global branch, hard regions for the local branch."""

    def __init__(self, channels: int, regions: int, reduction: int):
        super().__init__()
        self.soft = SoftAttention(channels, reduction)
        self.hard = HardAttention(channels, regions)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        squeezed = F.adaptive_avg_pool2d(x, 1)
        return self.soft(x, squeezed), self.hard(squeezed)


def _base_grid(height: int, width: int) -> torch.Tensor:
    """Pixel-centre coordinates in [-1, 1] of an (h, w) output, as grid_sample's (x, y) pairs."""
    ys = (torch.arange(height, dtype=torch.float32) * 2 + 1) / height - 1
    xs = (torch.arange(width, dtype=torch.float32) * 2 + 1) / width - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1)  # (h, w, 2)


class RegionCropper(nn.Module):
    """Crops T regions of a feature map at a fixed size: base grid * scale + translation -> grid_sample.

    The T region grids are stacked along the grid's height axis, so one ``grid_sample`` reads the
    map once per image (no T-fold copy of the feature map); the (N, C, T*h', w') result is then
    regrouped to (N*T, C, h', w'), the layout the shared local units run on.
    """

    def __init__(self, out_size: tuple[int, int], regions: int):
        super().__init__()
        self.regions = regions
        self.out_size = tuple(out_size)
        # Buffers follow the module's device/dtype; nothing is created on a fixed device in forward.
        self.register_buffer("base_grid", _base_grid(*out_size), persistent=False)
        self.register_buffer("scale", torch.tensor([1.0, 1.0 / regions]), persistent=False)

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        h, w = self.out_size
        # (N, T, 1, 1, 2) + (h', w', 2) -> (N, T*h', w', 2): the regions one above the other
        grid = (self.base_grid * self.scale + theta.unsqueeze(2).unsqueeze(2)).reshape(n, self.regions * h, w, 2)
        crops = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return crops.reshape(n, c, self.regions, h, w).transpose(1, 2).reshape(n * self.regions, c, h, w)


class HAN(nn.Module):
    """Harmonious Attention Network; eval mode returns the 1024-D [L2(global); L2(local)] feature."""

    def __init__(self, config: HANConfig, num_classes: int = 0):
        super().__init__()
        self.config = config
        d = config.widths
        t = config.regions
        self.stem = ConvBNReLU(3, config.stem_width, 3, stride=2)
        ins = (config.stem_width, d[0], d[1])
        self.blocks = nn.ModuleList(GlobalBlock(ins[i], d[i], config.strides) for i in range(3))
        self.attention = nn.ModuleList(HarmoniousAttention(d[i], t, config.reduction) for i in range(3))
        self.croppers = nn.ModuleList(RegionCropper(size, t) for size in config.crop_sizes)
        self.local_units = nn.ModuleList(Unit(ins[i], d[i], stride=2) for i in range(3))
        self.global_fc = _embedding(d[2], config.global_dim)
        self.local_fc = _embedding(t * d[2], config.local_dim)
        self.num_classes = num_classes
        if num_classes > 0:
            self.global_classifier = nn.Linear(config.global_dim, num_classes)
            self.local_classifier = nn.Linear(config.local_dim, num_classes)

    def check_input(self, x: torch.Tensor) -> None:
        expected = (3, *self.config.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise HanEdgeError(
                f"HAN({self.config.variant}) expects input of shape (N, {expected[0]}, {expected[1]}, "
                f"{expected[2]}) (N x 3 x height x width), got {tuple(x.shape)}"
            )

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Global and local 512-D features (before normalisation) and per-level attention outputs."""
        self.check_input(x)
        n = x.shape[0]
        t = self.config.regions
        block_in = self.stem(x)
        local = None
        levels = []
        for block, ha, crop, unit in zip(self.blocks, self.attention, self.croppers, self.local_units):
            out = block(block_in)
            soft, theta = ha(out)
            region = crop(block_in, theta)
            if local is not None:
                region = region + local   # Eq. 8: cross-attention interaction
            local = unit(region)
            block_in = out * soft
            levels.append({"soft": soft, "theta": theta})
        global_feat = self.global_fc(F.adaptive_avg_pool2d(block_in, 1).flatten(1))
        pooled = F.adaptive_avg_pool2d(local, 1).reshape(n, t * local.shape[1])
        local_feat = self.local_fc(pooled)
        return global_feat, local_feat, levels

    def forward(self, x: torch.Tensor):
        global_feat, local_feat, _ = self.features(x)
        if self.training and self.num_classes > 0:
            return {
                "global_logits": self.global_classifier(global_feat),
                "local_logits": self.local_classifier(local_feat),
                "global": global_feat,
                "local": local_feat,
            }
        return torch.cat([F.normalize(global_feat, dim=1), F.normalize(local_feat, dim=1)], dim=1)


def _embedding(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(inplace=True))


def deployed_parameters(model: HAN) -> int:
    """Parameters of the inference network (identity classifiers excluded)."""
    return sum(p.numel() for name, p in model.named_parameters() if "classifier" not in name)


MODELS = {}


def register(fn):
    """Register a builder under its name (timm style), so CLI flags map to builders."""
    MODELS[fn.__name__] = fn
    return fn


@register
def han_small(num_classes: int = 0) -> HAN:
    return HAN(get_config("small"), num_classes)


@register
def han_medium(num_classes: int = 0) -> HAN:
    return HAN(get_config("medium"), num_classes)


@register
def han_large(num_classes: int = 0) -> HAN:
    return HAN(get_config("large"), num_classes)


def build_model(config: HANConfig | str, num_classes: int = 0) -> HAN:
    """A HAN from a config (or a variant name)."""
    if isinstance(config, str):
        config = get_config(config)
    return HAN(config, num_classes)
