"""The segmentation network: a compact U-Net in plain torch, and its weights files.

The network maps a normalised field (one channel) to three maps at the same
resolution: the logits of *foreground* (cell or not), of the *normalised distance* of
each cell pixel to its own cell's border (1 at the cell's deepest point, 0 at its
border and outside) and of the *contact boundary* (cell pixels touching another
cell). :mod:`metascreen.segment.instances` explains why these three and turns them
into labelled cells.

Training can give each convolution extra branches that fold away afterwards
(``branches=True``, as RepVGG trains; :class:`_Branches`): the trained network is the
plain one, at the plain one's cost.

Weights are stored as safetensors (no pickle), with the architecture and training
metadata in the header and in a JSON file beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from metascreen.files import atomic_path

__all__ = ["OUTPUTS", "UNet", "load_network", "save_network"]

#: Output channels of the network, in order.
OUTPUTS: tuple[str, ...] = ("foreground", "distance", "boundary")


def _block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class _Branches(nn.Module):
    """One convolution as RepVGG trains it (Ding et al., CVPR 2021): a 3x3 and a 1x1
    convolution and, where input and output channels match, the identity, each with its
    own batch norm, summed. More paths for the gradient while training; in eval mode the
    sum is linear in its input and folds into one 3x3 kernel and a bias (:meth:`folded`).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(out_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.norm_identity = nn.BatchNorm2d(in_channels) if in_channels == out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm3(self.conv3(x)) + self.norm1(self.conv1(x))
        return y if self.norm_identity is None else y + self.norm_identity(x)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3x3 kernel and the bias of the same function, from the batch norms' running statistics."""
        branches = [(self.conv3.weight, self.norm3), (F.pad(self.conv1.weight, (1, 1, 1, 1)), self.norm1)]
        if self.norm_identity is not None:
            identity = torch.eye(self.conv3.in_channels, device=self.conv3.weight.device)[..., None, None]
            branches.append((F.pad(identity, (1, 1, 1, 1)), self.norm_identity))
        folded = [
            fuse_conv_bn_weights(weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            for weight, bn in branches
        ]
        return sum(kernel for kernel, _ in folded), sum(bias for _, bias in folded)


def _fold_into(branches: _Branches, conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Set a plain convolution and its batch norm (an identity that adds the bias) to
    compute what ``branches`` compute in eval mode."""
    kernel, bias = branches.folded()
    conv.weight.copy_(kernel)
    norm.weight.fill_(1.0)
    norm.bias.copy_(bias)
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0 - norm.eps)


def _branched_block(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        _Branches(in_channels, out_channels),
        nn.ReLU(inplace=True),
        _Branches(out_channels, out_channels),
        nn.ReLU(inplace=True),
    ]


class _JoiningDecoder(nn.Sequential):
    """A decoder level of the branched network: the coarser features upsampled (nearest,
    x2) and joined with the skip connection, in the order :class:`_Decoder` reads them."""

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(torch.cat([F.interpolate(coarse, scale_factor=2.0, mode="nearest"), skip], 1))


# Per axis, which taps of a 3x3 kernel (columns) reach each tap of a 4-tap transposed
# kernel of stride 2 (rows) that reads the coarse features themselves: output pixel 2i sees
# the upsampled pixels 2i-1, 2i, 2i+1, that is coarse i-1 (tap 3) and i twice (tap 1);
# 2i+1 sees coarse i twice (tap 2) and i+1 (tap 0).
_UPSAMPLED_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


class _Decoder(nn.Sequential):
    """A decoder level: the coarser features upsampled (nearest, x2) and joined with the
    encoder's skip connection, then two convolution blocks.

    A 3x3 convolution of a nearest x2 upsampling reads only 2 x 2 distinct coarse pixels
    per output pixel, so the part of the first convolution that reads the upsampled
    features runs as a stride-2 transposed convolution of the coarse features, its kernel
    made from the 3x3 one: the same outputs and gradients with 4/9 of the
    multiplications, and neither the upsampled copy nor the concatenation is made.
    """

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        # a buffer moves with the module (no host-to-GPU copy per pass); not saved in weights files
        self.register_buffer("taps", _UPSAMPLED_TAPS.clone(), persistent=False)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        first, *rest = self
        weight, n_coarse = first.weight, coarse.shape[1]
        transposed = torch.einsum("ay,oiyx,bx->ioab", self.taps, weight[:, :n_coarse], self.taps)
        x = F.conv2d(skip, weight[:, n_coarse:], first.bias, padding=1)
        x.add_(F.conv_transpose2d(coarse, transposed, stride=2, padding=1))
        for layer in rest:
            x = layer(x)
        return x


class UNet(nn.Module):
    """U-Net: ``depth`` poolings, ``base`` channels doubling per level (capped at 4x).

    Input ``(N, 1, H, W)`` with ``H`` and ``W`` multiples of ``2**depth``; output
    ``(N, 3, H, W)`` logits (:data:`OUTPUTS`). With ``base=24, depth=3`` (the shipped
    weights) it has ~0.68 M parameters (``base=16``: ~0.3 M) and a receptive field of 92 px
    (measured from the gradient; the width does not change it), several training cell
    diameters, so a cell in a confluent layer is judged with its neighbours in view.

    ``branches`` builds the network for training with RepVGG branches in place of each
    convolution and batch norm (:class:`_Branches`); :meth:`without_branches` folds them
    into the plain network, the one that is saved and run.
    """

    def __init__(self, base: int = 16, depth: int = 3, *, branches: bool = False) -> None:
        super().__init__()
        self.config = {"base": base, "depth": depth}
        self.branches = branches
        block, decoder = (_branched_block, _JoiningDecoder) if branches else (_block, _Decoder)
        widths = [base * min(2**level, 4) for level in range(depth + 1)]
        self.encoders = nn.ModuleList(
            [
                nn.Sequential(*block(1 if level == 0 else widths[level - 1], widths[level]))
                for level in range(depth + 1)
            ]
        )
        self.decoders = nn.ModuleList(
            [decoder(*block(widths[level + 1] + widths[level], widths[level])) for level in range(depth)]
        )
        self.head = nn.Conv2d(widths[0], len(OUTPUTS), 1)

    @property
    def size_multiple(self) -> int:
        """Input heights and widths must be multiples of this (the total down-sampling)."""
        return 2 ** self.config["depth"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        for level in reversed(range(len(self.decoders))):
            x = self.decoders[level](x, skips[level])
        return self.head(x)

    def without_branches(self) -> UNet:
        """The plain network (in eval mode) that a branched one folds into: each
        convolution's branches become one 3x3 kernel, its bias carried by an identity batch
        norm; the branched network's outputs in eval mode. A plain network comes back itself."""
        if not self.branches:
            return self
        plain = UNet(**self.config).eval().to(self.head.weight.device)
        with torch.no_grad():
            for levels, plain_levels in ((self.encoders, plain.encoders), (self.decoders, plain.decoders)):
                # branches, ReLU, branches, ReLU -> convolution, batch norm, ReLU (twice)
                for branched, block in zip(levels, plain_levels, strict=True):
                    _fold_into(branched[0], block[0], block[1])
                    _fold_into(branched[2], block[3], block[4])
            plain.head.load_state_dict(self.head.state_dict())
        return plain

    def fused(self) -> UNet:
        """An inference copy (eval mode) with each batch norm folded into its convolution
        (and a branched network's branches first, :meth:`without_branches`): the same
        outputs, fewer passes over memory."""
        fused = UNet(**self.config).eval()
        fused.load_state_dict(self.without_branches().state_dict())
        for blocks in (fused.encoders, fused.decoders):
            for index, (conv1, bn1, relu1, conv2, bn2, relu2) in enumerate(blocks):
                blocks[index] = type(blocks[index])(
                    fuse_conv_bn_eval(conv1, bn1), relu1, fuse_conv_bn_eval(conv2, bn2), relu2
                )
        return fused


def save_network(network: UNet, path: str | Path, metadata: dict[str, Any]) -> None:
    """Write ``network``'s weights as safetensors and ``metadata`` (plus the architecture)
    into its header and into ``path`` with suffix ``.json``."""
    path = Path(path)
    metadata = {**metadata, "architecture": network.config}
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    with atomic_path(path) as partial:
        save_file(state, str(partial), metadata={"metascreen": json.dumps(metadata, sort_keys=True)})
    with atomic_path(path.with_suffix(".json")) as partial:
        partial.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def load_network(
    path: str | Path, device: torch.device | str = "cpu", *, fuse: bool = True
) -> tuple[UNet, dict[str, Any]]:
    """The network stored at ``path`` (in eval mode, on ``device``) and its metadata.

    ``fuse`` folds the batch norms into the convolutions (:meth:`UNet.fused`), for
    inference; fine-tuning needs ``fuse=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmentation weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = json.loads(header["metascreen"])
        network = UNet(**metadata["architecture"])
        network.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, OSError, SafetensorError) as error:
        raise ValueError(f"{path}: not a metascreen segmentation weights file ({error})") from error
    network = network.fused() if fuse else network.eval()
    return network.to(device), metadata
