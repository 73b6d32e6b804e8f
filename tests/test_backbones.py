"""PANNs backbones: official key names and shapes, checkpoint loading, an independent forward, masking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clotho_retrieve.models.backbones import SKIPPED_PREFIXES, build_backbone, load_panns_checkpoint
from clotho_retrieve.utils import ClothoRetrieveError

REFERENCE = Path("/work/shared/reference")
if not REFERENCE.is_dir():  # the shared reference folder may sit beside the checkout elsewhere
    REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def read_keys(name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """reference/<name>_keys.tsv -> {key: (dtype, shape)}."""
    path = REFERENCE / f"{name}_keys.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    rows = {}
    for line in path.read_text().splitlines()[1:]:
        key, dtype, shape = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
        rows[key] = (dtype, dims)
    return rows


def fake_checkpoint(name: str, seed: int = 0) -> dict:
    """A checkpoint dict with exactly the official keys, dtypes and shapes, random values."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, (dtype, shape) in read_keys(name).items():
        if dtype == "int64":
            state[key] = torch.randint(0, 1000, shape, generator=g, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5  # variances must be positive
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return {"model": state, "iteration": 0}


@pytest.mark.parametrize("name", ["cnn14", "cnn10", "cnn6"])
def test_layout_and_loading_match_official_checkpoint(name, tmp_path):
    ckpt = fake_checkpoint(name)
    path = tmp_path / f"{name}.pth"
    torch.save(ckpt, path)
    backbone = build_backbone(name)
    official = {k: v for k, v in read_keys(name).items() if not k.startswith(SKIPPED_PREFIXES)}
    ours = backbone.state_dict()
    assert {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in ours.items()} == official

    report = load_panns_checkpoint(backbone, path)
    assert sorted(report["loaded"]) == sorted(official)
    assert sorted(report["skipped"]) == sorted(k for k in ckpt["model"] if k.startswith(SKIPPED_PREFIXES))
    assert {k.split(".")[0] for k in report["skipped"]} == {
        "spectrogram_extractor",
        "logmel_extractor",
        "fc1",
        "fc_audioset",
    }
    for k, v in backbone.state_dict().items():  # the weights used are the file's
        assert torch.equal(v, ckpt["model"][k]), k
    check_forward(backbone, ckpt["model"], name)


def check_forward(backbone, state: dict, name: str) -> None:
    """Our forward (eval, no padding) equals the reference on the same weights."""
    backbone.eval()
    x = torch.randn(1, 70, 64)
    with torch.no_grad():
        frames, lengths = backbone(x, torch.tensor([70]))
        expected = reference_panns_forward(state, name, x)
    stride = 32 if name == "cnn14" else 16
    channels = 2048 if name == "cnn14" else 512
    assert frames.shape == (1, 70 // stride, channels) == expected.shape
    assert lengths.tolist() == [70 // stride]
    torch.testing.assert_close(frames, expected, rtol=1e-4, atol=1e-5)


def reference_panns_forward(state: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """The official PANNs forward (eval mode) written directly on the state-dict tensors.

    x (B, T, 64) log-Mel -> (B, T', C): bn0 over Mel bins, conv blocks, avg pooling, mean over frequency.
    """

    def bn(t, prefix):
        return F.batch_norm(
            t, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
            state[f"{prefix}.weight"], state[f"{prefix}.bias"], training=False, eps=1e-5,
        )  # fmt: skip

    x = x[:, None]  # (B, 1, T, M)
    x = bn(x.transpose(1, 3), "bn0").transpose(1, 3)
    n_blocks = {"cnn14": 6, "cnn10": 4, "cnn6": 4, "tiny": 4}[name]
    for i in range(1, n_blocks + 1):
        p = f"conv_block{i}"
        if name == "cnn6":
            x = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"], padding=2), f"{p}.bn1"))
        else:
            x = F.relu(bn(F.conv2d(x, state[f"{p}.conv1.weight"], padding=1), f"{p}.bn1"))
            x = F.relu(bn(F.conv2d(x, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2"))
        pool = (1, 1) if (name == "cnn14" and i == 6) else (2, 2)
        x = F.avg_pool2d(x, kernel_size=pool)
    return x.mean(dim=3).transpose(1, 2)


@pytest.mark.parametrize("name", ["tiny", "cnn6"])
def test_clip_alone_equals_clip_in_padded_batch(name):
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    for m in backbone.modules():  # non-trivial BN statistics, so padding would leak if unmasked
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    lengths = torch.tensor([75, 41, 9])
    x = torch.randn(3, 75, 64) * 3
    x[1, 41:] = 5.0  # padding content must not matter
    x[2, 9:] = -7.0
    with torch.no_grad():
        batch, out_lengths = backbone(x, lengths)
        for i, n in enumerate(lengths.tolist()):
            alone, alone_len = backbone(x[i : i + 1, :n], lengths[i : i + 1])
            assert out_lengths[i] == alone_len[0] == max(n // 16, 1)
            torch.testing.assert_close(batch[i, : alone_len[0]], alone[0], rtol=1e-4, atol=1e-5)


def test_output_lengths():
    with torch.device("meta"):  # lengths need no weights: skip initialising CNN14's 80M parameters
        cnn14 = build_backbone("cnn14")
    tiny = build_backbone("tiny")
    lengths = torch.tensor([1, 31, 32, 65, 2584])
    assert cnn14.output_lengths(lengths).tolist() == [1, 1, 1, 2, 80]  # floor(T / 32), at least 1
    assert tiny.output_lengths(lengths).tolist() == [1, 1, 2, 4, 161]  # floor(T / 16), at least 1
    assert [b.conv1.out_channels for b in tiny.blocks] == [16, 32, 64, 128]


def test_bad_checkpoints_fail_clearly(tmp_path):
    backbone = build_backbone("cnn6")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    good = fake_checkpoint("cnn6")

    bad_shape = {"model": dict(good["model"]), "iteration": 0}
    bad_shape["model"]["conv_block2.conv1.weight"] = torch.zeros(128, 64, 3, 3)
    torch.save(bad_shape, tmp_path / "shape.pth")
    with pytest.raises(ClothoRetrieveError, match=r"shape.pth: conv_block2.conv1.weight has shape"):
        load_panns_checkpoint(backbone, tmp_path / "shape.pth")

    unknown = {"model": {**good["model"], "conv_block9.conv1.weight": torch.zeros(1)}}
    torch.save(unknown, tmp_path / "unknown.pth")
    with pytest.raises(ClothoRetrieveError, match=r"1 unexpected key.*conv_block9"):
        load_panns_checkpoint(backbone, tmp_path / "unknown.pth")

    missing = {"model": {k: v for k, v in good["model"].items() if not k.startswith("bn0.")}}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ClothoRetrieveError, match=r"5 missing key"):
        load_panns_checkpoint(backbone, tmp_path / "missing.pth")

    # a CNN10 checkpoint is not a CNN6 one
    torch.save(fake_checkpoint("cnn10"), tmp_path / "cnn10.pth")
    with pytest.raises(ClothoRetrieveError, match="does not match the cnn6 backbone"):
        load_panns_checkpoint(backbone, tmp_path / "cnn10.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ClothoRetrieveError, match="not a readable PyTorch checkpoint"):
        load_panns_checkpoint(backbone, tmp_path / "garbage.pth")
    with pytest.raises(ClothoRetrieveError, match="no such checkpoint"):
        load_panns_checkpoint(backbone, tmp_path / "absent.pth")
    after = backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # failed loads change nothing


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    """weights_only=True: a pickle that would run code is rejected, not executed."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ClothoRetrieveError, match="not a readable PyTorch checkpoint"):
        load_panns_checkpoint(build_backbone("tiny"), tmp_path / "evil.pth")


def test_retrieval_model_loads_audio_weights_into_its_backbone(tmp_path):
    from clotho_retrieve.models import ModelConfig, RetrievalModel

    ckpt = fake_checkpoint("cnn6", seed=4)
    torch.save(ckpt, tmp_path / "Cnn6_mAP=0.343.pth")
    model = RetrievalModel(ModelConfig(backbone="cnn6", attention="none", d_a=512), parts=("audio",))
    report = model.load_audio_weights(tmp_path / "Cnn6_mAP=0.343.pth")
    assert report["iteration"] == 0 and len(report["skipped"]) == 7
    loaded = model.audio.backbone.conv_block3.conv1.weight
    assert torch.equal(loaded, ckpt["model"]["conv_block3.conv1.weight"])
    assert isinstance(model.audio.to_d_a, torch.nn.Identity)  # C = D_A = 512: no projection
