"""VGGish, COMBO's frozen audio encoder: one 128-d embedding per 0.96 s log-mel example (docs/model.md, 'COMBO').

Six 3x3 convolutions (padding 1, each followed by ReLU) with 2x2 max pools after the 1st, 2nd, 4th and 6th,
turning an example [N, 1, 96, 64] (96 frames x 64 mel bands, fed as is: no transpose) into [N, 512, 6, 4]; the
map is flattened channels-last (h, w, c order: the TensorFlow layout the released weights were trained with) and
three linear layers, each followed by ReLU, give the embedding (so it is non-negative). The PCA + 8-bit
quantisation post-processor of the original release is not built: COMBO runs with it switched off.

Module names follow the layout of the released ``vggish-10086976.pth`` (``features.{0,3,6,8,11,13}``,
``embeddings.{0,2,4}``), so the importer (``av2ts convert --kind vggish``) is a prefix rename.
"""

from __future__ import annotations

import torch
from torch import nn

from av2ts_cli.config import EXAMPLE_FRAMES, MEL_BANDS

POOL_AFTER = (0, 1, 3, 5)  # the convs followed by a 2x2 max pool: 96x64 -> 48x32 -> 24x16 -> 12x8 -> 6x4
FINAL_HEIGHT, FINAL_WIDTH = EXAMPLE_FRAMES // 16, MEL_BANDS // 16


class VGGish(nn.Module):
    """[N, 1, 96, 64] log-mel examples -> [N, out_dim] embeddings (>= 0).

    ``widths``: the six conv widths (64, 128, 256, 256, 512, 512 in the release); ``hidden``: the two hidden
    linear widths (4096); ``out_dim``: the embedding width (128). Smaller values exist only for tiny test models.
    ``embeddings=False`` (VCT, which reads the conv map): the linear layers are not built and ``forward`` returns
    the map [N, widths[-1], 6, 4] (6 time steps x 4 mel groups).
    """

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 256, 512, 512), hidden: int = 4096,
                 out_dim: int = 128, embeddings: bool = True):
        super().__init__()
        if len(widths) != 6:
            raise ValueError(f"VGGish has 6 convolutions, got {len(widths)} widths")
        layers: list[nn.Module] = []
        in_channels = 1
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU()]
            if i in POOL_AFTER:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            in_channels = width
        self.features = nn.Sequential(*layers)
        if embeddings:
            self.embeddings = nn.Sequential(
                nn.Linear(in_channels * FINAL_HEIGHT * FINAL_WIDTH, hidden), nn.ReLU(),
                nn.Linear(hidden, hidden), nn.ReLU(),
                nn.Linear(hidden, out_dim), nn.ReLU())
        # He init with zero biases, for a VGGish that stays random (tiny presets, training without the released
        # weights): with PyTorch's default init the biases outweigh the signal after nine layers, and the frozen
        # encoder gives every clip nearly the same embedding (its spread across 16 synthetic S4 clips was 0.3% of
        # its mean; with He init 54%).
        for layer in self.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)

    def forward(self, examples: torch.Tensor) -> torch.Tensor:
        """examples: [N, 1, 96, 64] log-mel (frames x mel bands) -> [N, out_dim] (without embeddings: the conv
        map [N, C, 6, 4])."""
        if examples.dim() != 4 or tuple(examples.shape[1:]) != (1, EXAMPLE_FRAMES, MEL_BANDS):
            raise ValueError(f"VGGish input must be [N, 1, {EXAMPLE_FRAMES}, {MEL_BANDS}], got {list(examples.shape)}")
        x = self.features(examples)  # [N, C, 6, 4]
        if not hasattr(self, "embeddings"):
            return x
        x = x.permute(0, 2, 3, 1).flatten(1)  # channels last before flattening: the released weights' order
        return self.embeddings(x)
