"""Audio backbones: PANNs CNN14 / CNN10 / CNN6 (layer for layer as the official models) and a tiny CNN.

Each backbone maps a batch of log-Mel spectrograms (B, T, M) to frame features F (B, T', C): the
convolutional blocks, then the mean over the frequency axis, with no pooling over time (the paper pools
over time only after the attention module). Module names equal the official PANNs ones (``bn0``,
``conv_block1.conv1``, ...), so the AudioSet checkpoints load with :func:`load_panns_checkpoint`.

Clips in a batch differ in length. Every backbone takes ``lengths`` (valid input frames per clip) and
zeroes the padded frames after bn0 and after every convolution, exactly where a clip processed alone
would see the convolution's zero padding. In eval mode a clip's frame features therefore do not depend
on what it was batched with. (In train mode BatchNorm's batch statistics still see the zeros.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import Tensor, nn

from clotho_retrieve.utils import ClothoRetrieveError, err_console

# Official checkpoint entries we deliberately do not load: the STFT / Mel front end (our features are
# precomputed) and the AudioSet classifier head (retrieval uses frame features, not tags).
SKIPPED_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.", "fc1.", "fc_audioset.")


def _init_conv(conv: nn.Conv2d) -> None:
    nn.init.xavier_uniform_(conv.weight)  # as PANNs' init_layer


def _init_bn(bn: nn.BatchNorm2d) -> None:
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)


def _time_mask(lengths: Tensor, T: int) -> Tensor:
    """(B,) valid frames -> (B, 1, T, 1) float mask broadcasting over (B, C, T, M)."""
    return (torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]).float()[:, None, :, None]


class ConvBlock(nn.Module):
    """PANNs ConvBlock: (3x3 conv, BN, ReLU) x 2, then average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        for m in (self.conv1, self.conv2):
            _init_conv(m)
        for m in (self.bn1, self.bn2):
            _init_bn(m)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # (B, C_in, T, M) -> (B, C_out, T, M)
        x = F.relu(self.bn1(self.conv1(x))) * mask
        return F.relu(self.bn2(self.conv2(x))) * mask


class ConvBlock5x5(nn.Module):
    """PANNs ConvBlock5x5 (CNN6): one 5x5 conv, BN, ReLU, then average pooling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        _init_conv(self.conv1)
        _init_bn(self.bn1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x))) * mask


class PannsBackbone(nn.Module):
    """bn0 over the Mel bins, then ``conv_block1..N`` each followed by pooling and dropout.

    ``pools[i]`` is block i's (time, frequency) average-pooling size: (2, 2) everywhere except CNN14's
    last block, which pools (1, 1) as in the official model.
    """

    def __init__(
        self,
        name: str,
        channels: tuple[int, ...],
        block: type[nn.Module],
        pools: tuple[int, ...],
        n_mels: int = 64,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.name = name
        self.pools = pools
        self.dropout = dropout
        self.out_channels = channels[-1]
        self.bn0 = nn.BatchNorm2d(n_mels)
        _init_bn(self.bn0)
        in_ch = 1
        for i, out_ch in enumerate(channels, start=1):
            self.add_module(f"conv_block{i}", block(in_ch, out_ch))
            in_ch = out_ch
        self.time_stride = 1
        for p in pools:
            self.time_stride *= p

    @property
    def blocks(self) -> list[nn.Module]:
        return [getattr(self, f"conv_block{i}") for i in range(1, len(self.pools) + 1)]

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Input frames (B,) -> output frames T' (B,): floor division per pooling, at least 1 frame."""
        lengths = lengths.clamp(min=1)
        for p in self.pools:
            lengths = (lengths // p).clamp(min=1)
        return lengths

    def forward(self, logmel: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """logmel (B, T, M), lengths (B,) -> frame features F (B, T', C) and T' per clip (B,)."""
        if logmel.shape[1] < self.time_stride:  # too short to survive the poolings: pad (masked anyway)
            logmel = F.pad(logmel, (0, 0, 0, self.time_stride - logmel.shape[1]))
        lengths = lengths.to(logmel.device).clamp(min=1)
        x = logmel[:, None]  # (B, 1, T, M)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # bn0 normalises each Mel bin
        x = x * _time_mask(lengths, x.shape[2])
        for block, p in zip(self.blocks, self.pools, strict=True):
            x = block(x, _time_mask(lengths, x.shape[2]))  # (B, C, T, M)
            if p > 1:
                x = F.avg_pool2d(x, kernel_size=p)
                lengths = (lengths // p).clamp(min=1)
                x = x * _time_mask(lengths, x.shape[2])
            x = F.dropout(x, p=self.dropout, training=self.training)
        frames = x.mean(dim=3).transpose(1, 2)  # mean over frequency: (B, C, T') -> (B, T', C)
        return frames, lengths


BACKBONES = ("cnn14", "cnn10", "cnn6", "tiny")


def build_backbone(name: str, n_mels: int = 64, dropout: float = 0.2) -> PannsBackbone:
    """cnn14 | cnn10 | cnn6 (official PANNs layouts) | tiny (4 small blocks, a CPU demo: not in the paper)."""
    if name == "cnn14":
        channels = (64, 128, 256, 512, 1024, 2048)
        return PannsBackbone(name, channels, ConvBlock, (2, 2, 2, 2, 2, 1), n_mels, dropout)
    if name == "cnn10":
        return PannsBackbone(name, (64, 128, 256, 512), ConvBlock, (2, 2, 2, 2), n_mels, dropout)
    if name == "cnn6":
        return PannsBackbone(name, (64, 128, 256, 512), ConvBlock5x5, (2, 2, 2, 2), n_mels, dropout)
    if name == "tiny":
        return PannsBackbone(name, (16, 32, 64, 128), ConvBlock, (2, 2, 2, 2), n_mels, dropout)
    raise ClothoRetrieveError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def load_panns_checkpoint(backbone: nn.Module, path: str | Path) -> dict:
    """Load an official PANNs AudioSet checkpoint (e.g. ``Cnn14_mAP=0.431.pth``) into ``backbone``.

    The file is read with ``torch.load(weights_only=True)``; its ``model`` entry (or the file itself, if
    it is a bare state dict) must hold every backbone key with the right shape. The front-end buffers
    and the classifier (``fc1``, ``fc_audioset``) are skipped; any other missing, unexpected or
    mis-shaped key raises ClothoRetrieveError. Returns a report
    ``{"path", "loaded", "skipped", "iteration"}`` and prints a summary to stderr.
    """
    path = Path(path)
    if not path.is_file():
        raise ClothoRetrieveError(
            f"{path}: no such checkpoint file; download it with `clotho-retrieve download`"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-tensor payloads
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClothoRetrieveError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ClothoRetrieveError(f"{path}: expected a dict whose 'model' entry is a PANNs state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}

    skipped = sorted(k for k in state if k.startswith(SKIPPED_PREFIXES))
    source = {k: v for k, v in state.items() if not k.startswith(SKIPPED_PREFIXES)}
    target = backbone.state_dict()
    name = getattr(backbone, "name", type(backbone).__name__)
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[0]}")
        raise ClothoRetrieveError(
            f"{path}: does not match the {name} backbone ({'; '.join(parts)}); "
            f"is it the checkpoint of another architecture?"
        )
    for k, v in source.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise ClothoRetrieveError(
                f"{path}: {k} has shape {tuple(v.shape)}, "
                f"the {name} backbone expects {tuple(target[k].shape)}"
            )
    backbone.load_state_dict(source, strict=True)

    report = {
        "path": str(path),
        "loaded": sorted(source),
        "skipped": skipped,
        "iteration": int(ckpt["iteration"]) if isinstance(ckpt, dict) and "iteration" in ckpt else None,
    }
    table = Table(title=f"PANNs weights -> {name}", show_header=True)
    table.add_column("")
    table.add_column("tensors", justify="right")
    table.add_column("keys")
    loaded_modules = ["bn0", *sorted({k.split(".")[0] for k in source} - {"bn0"})]
    skipped_modules = sorted({k.split(".")[0] for k in skipped})
    table.add_row("loaded", str(len(source)), ", ".join(loaded_modules))
    table.add_row("skipped", str(len(skipped)), ", ".join(skipped_modules) or "-")
    err_console.print(table)
    return report
