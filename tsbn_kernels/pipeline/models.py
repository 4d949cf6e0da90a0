"""Models of the benchmarks: ResNet (torchvision parameter names, so torchvision checkpoints load), DeepLabV3 ASPP
heads, and the multi-task wrappers with the replicated batch of DESIGN.md §1.

Norm choices: "bn" (hard sharing: one batch norm, one forward), "tsbn" (task-specific γ_t, β_t) and
"tssigmabn" (task-specific sigmoid gates, the default). With task-specific norms the stem convolution runs once
on the N input images and its output is repeated T times just before the first norm.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import convert_batchnorm, convert_layernorm
from ..modules import TSLayerNorm, _TSBatchNorm
from ..mtl.per_task_grads import replicate as replicate_batch
from .celeba_data import ATTRIBUTES
from .vit import VisionTransformer, load_timm_state, vit_small

NORMS = ("bn", "tsbn", "tssigmabn")


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout and names (conv1, bn1, layer1..4, no fc). ``dilate`` replaces the strides of
    layer2..4 by dilation as torchvision's replace_stride_with_dilation (DeepLab: (False, True, True), output
    stride 8); ``width`` is the stem width (64 in the real model, smaller for CPU runs)."""

    def __init__(self, block: type, layers: Sequence[int], width: int = 64,
                 dilate: Sequence[bool] = (False, False, False), small_input: bool = False):
        super().__init__()
        self.inplanes, self.dilation = width, 1
        self.conv1 = (nn.Conv2d(3, width, 3, 1, 1, bias=False) if small_input
                      else nn.Conv2d(3, width, 7, 2, 3, bias=False))
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, width, layers[0])
        self.layer2 = self._layer(block, width * 2, layers[1], 2, dilate[0])
        self.layer3 = self._layer(block, width * 4, layers[2], 2, dilate[1])
        self.layer4 = self._layer(block, width * 8, layers[3], 2, dilate[2])
        self.out_channels = width * 8 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _layer(self, block, planes, blocks, stride=1, dilate=False):
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor, replicate: int = 1, stem_once: bool = True) -> Tensor:
        if replicate > 1 and not stem_once:
            x = x.repeat(replicate, *([1] * (x.dim() - 1)))
        x = self.conv1(x)
        if replicate > 1 and stem_once:   # each task's block starts at the first (task-specific) norm
            x = replicate_batch(x, replicate)
        x = self.maxpool(self.relu(self.bn1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet50(width: int = 64, dilated: bool = True) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), width, (False, True, True) if dilated else (False, False, False))


def resnet18(width: int = 64, small_input: bool = True) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), width, small_input=small_input)


class ASPPHead(nn.Module):
    """DeepLabV3 head: ASPP (1×1, three 3×3 atrous branches, image pooling), projection, 3×3 conv, classifier."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = (12, 24, 36), width: int = 256):
        super().__init__()

        def branch(kernel, rate):
            return nn.Sequential(nn.Conv2d(in_channels, width, kernel, padding=0 if kernel == 1 else rate,
                                           dilation=rate, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList([branch(1, 1)] + [branch(3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, width, 1, bias=False),
                                  nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(width * (len(rates) + 2), width, 1, bias=False),
                                     nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.refine = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                    nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        feats = torch.cat([b(x) for b in self.branches] + [pooled], dim=1)
        return self.classifier(self.refine(self.project(feats)))


class MultiTaskNet(nn.Module):
    """A shared encoder with one head per task. ``forward(x)`` returns {task: output}; with task-specific norms
    the encoder runs on the replicated batch and head t reads block t."""

    def __init__(self, encoder: ResNet, heads: dict[str, nn.Module], norm: str = "tssigmabn", backend: str = "auto"):
        super().__init__()
        # stem_once=False replicates the input instead of the stem's output (the outputs are the same); with
        # stem_once the replication is mtl.replicate, after which mtl.OneBackward splits the stem's gradients too.
        self.stem_once = True
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm, self.tasks = norm, list(heads)
        if norm != "bn":
            gate = "none" if norm == "tsbn" else "sigmoid"
            encoder = convert_batchnorm(encoder, len(heads), gate=gate, backend=backend)
            encoder = convert_layernorm(encoder, len(heads), gate=gate, backend=backend)
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The encoder's parameters outside its task-specific norms: the ones gradient aggregation combines."""
        task_specific = {id(p) for m in self.encoder.modules() if isinstance(m, (_TSBatchNorm, TSLayerNorm))
                         for p in m.parameters()}
        return [p for p in self.encoder.parameters() if id(p) not in task_specific]

    def split_layers(self) -> list[nn.Module]:
        """The encoder's Conv2d/Linear layers, whose weight gradients mtl.OneBackward splits by task block."""
        return [m for m in self.encoder.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def before_replication_parameters(self) -> list[nn.Parameter]:
        """Shared parameters outside the split layers (a ViT's class token and position embedding): used before
        mtl.replicate, so that OneBackward gives their per-task gradients too."""
        in_layers = {id(p) for m in self.split_layers() for p in m.parameters()}
        return [p for p in self.shared_parameters() if id(p) not in in_layers]

    def set_backend(self, backend: str) -> None:
        for m in self.encoder.modules():
            if isinstance(m, (_TSBatchNorm, TSLayerNorm)):
                m.backend = backend

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        replicate = self.num_tasks if self.norm != "bn" else 1
        features = self.encoder(x, replicate=replicate, stem_once=self.stem_once)
        blocks = features.chunk(replicate) if replicate > 1 else [features] * self.num_tasks
        out = {}
        for task, block in zip(self.tasks, blocks):
            y = self.heads[task](block)
            out[task] = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False) if y.dim() == 4 else y
        return out


class DenseHead(nn.Module):
    """The light head of ViT dense prediction: 3×3 conv, BN, ReLU, 1×1 classifier on the patch-token map."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 256):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.classifier = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.relu(self.bn(self.conv(x))))


DENSE_TASKS = {"nyuv2": {"segmentation": 13, "depth": 1, "normal": 3}, "cityscapes": {"segmentation": 7, "depth": 1},
               "pascal": {"segmentation": 21, "human_parts": 7, "saliency": 1, "normal": 3, "edge": 1}}
ARCHS = {"nyuv2": ("resnet50",), "cityscapes": ("resnet50",), "celeba": ("resnet18",), "pascal": ("vit_s", "resnet50")}


def build_model(benchmark: str, norm: str = "tssigmabn", width: int = 64, head_width: int = 256,
                backend: str = "auto", pretrained: str | None = None, arch: str | None = None,
                image_size: tuple[int, int] = (512, 512)) -> MultiTaskNet:
    """NYUv2 / Cityscapes: dilated ResNet-50 + one ASPP head per task; CelebA: ResNet-18 + one linear head per
    attribute; PASCAL-Context: ViT-S/16 (``arch="vit_s"``, the default; TSσLN norms, ``image_size`` sizes its
    position embedding) + a light conv head per task, or ``arch="resnet50"`` as NYUv2. ``pretrained``: a
    torchvision ResNet or timm ViT state_dict file (classifier dropped), loaded before the norm conversion."""
    if benchmark not in ARCHS:
        raise ValueError(f"no model for benchmark {benchmark!r}; models: {sorted(ARCHS)}")
    arch = arch or ARCHS[benchmark][0]
    if arch not in ARCHS[benchmark]:
        raise ValueError(f"{benchmark}: arch must be one of {ARCHS[benchmark]}, got {arch!r}")
    if arch == "vit_s":
        encoder = vit_small(image_size, width)
        heads = {task: DenseHead(encoder.out_channels, channels, head_width)
                 for task, channels in DENSE_TASKS[benchmark].items()}
    elif arch == "resnet50":
        encoder = resnet50(width)
        heads = {task: ASPPHead(encoder.out_channels, channels, width=head_width)
                 for task, channels in DENSE_TASKS[benchmark].items()}
    else:
        encoder = resnet18(width)
        # One head per attribute, named as the metrics, the losses and list_attr_celeba.txt name it.
        heads = {name: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(encoder.out_channels, 1))
                 for name in ATTRIBUTES}
    if pretrained:
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        if isinstance(encoder, VisionTransformer):
            load_timm_state(encoder, state)
        else:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = encoder.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{pretrained} does not match the encoder: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    return MultiTaskNet(encoder, heads, norm, backend)
