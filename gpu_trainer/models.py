"""The models, apart from the training loop: an MLP for tabular data and a small CNN for images."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gpu_trainer.errors import TrainerError


class Standardize(nn.Module):
    """Per-feature standardization with statistics from the training split, stored as buffers.

    Part of the model (not the data pipeline) so the logged model scores raw features as-is.

    :param num_features: input width.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def fit(self, features: torch.Tensor) -> None:
        """Set the statistics from training features; constant features keep a unit scale."""
        with torch.no_grad():
            self.mean.copy_(features.mean(dim=0))
            std = features.std(dim=0)
            self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    """Two hidden layers with LayerNorm and GELU: a solid default for tabular features.

    :param num_features: input width.
    :param num_classes: output classes.
    :param hidden_dim: hidden width.
    """

    def __init__(self, num_features: int, num_classes: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.standardize = Standardize(num_features)
        self.net = nn.Sequential(
            nn.Linear(num_features, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardize(x))


def image_shape(num_features: int) -> tuple[int, int, int]:
    """The (channels, height, width) behind a flat feature vector: one square channel, else three.

    :param num_features: the flat feature count.
    :raises TrainerError: when the features are not a square single- or three-channel image.
    """
    for channels in (1, 3):
        side = math.isqrt(num_features // channels)
        if num_features % channels == 0 and side * side * channels == num_features:
            return channels, side, side
    raise TrainerError(
        f"--model cnn needs image-shaped features (C*H*W with C in (1, 3) and H == W), got {num_features} features"
    )


class CNN(nn.Module):
    """A small convolutional classifier over flat features reshaped to (C, H, W).

    :param num_features: input width (C*H*W).
    :param num_classes: output classes.
    :param hidden_dim: width of the classifier head.
    """

    def __init__(self, num_features: int, num_classes: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.shape = image_shape(num_features)
        channels = self.shape[0]
        self.standardize = Standardize(num_features)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 16, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = self.standardize(x).reshape(x.shape[0], *self.shape)
        if images.is_cuda:
            # cuDNN's NHWC kernels are the fast path for convolutions under bf16/fp16 autocast.
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.features(images))


def build_model(name: str, num_features: int, num_classes: int, hidden_dim: int) -> nn.Module:
    """Instantiate a model by name.

    :param name: ``mlp`` or ``cnn``.
    :param num_features: input width.
    :param num_classes: output classes.
    :param hidden_dim: hidden width.
    """
    if name == "mlp":
        return MLP(num_features, num_classes, hidden_dim)
    if name == "cnn":
        return CNN(num_features, num_classes, hidden_dim)
    raise TrainerError(f"--model must be one of ['mlp', 'cnn'], got {name!r}")


def flops_per_sample(model: nn.Module, num_features: int) -> float:
    """Forward FLOPs for one sample (2 per multiply-accumulate, Linear and Conv2d only).

    Training costs about three times this (forward + backward); used for model FLOPs utilisation.

    :param model: the model.
    :param num_features: input width.
    """
    total = 0.0
    hooks = []

    def linear_hook(module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += 2.0 * module.in_features * module.out_features

    def conv_hook(module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += 2.0 * kernel * output[0].numel()

    for module in model.modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear_hook))
        elif isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv_hook))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, num_features))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return total
