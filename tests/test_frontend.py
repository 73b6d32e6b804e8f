"""The log-Mel front end against librosa, its presets, bad waveforms, and decoding long files in blocks."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import soundfile as sf
from audio_signals import chirp_noise

from clotho_retrieve.frontend import PRESETS, FrontEnd, decode_log_mel, log_mel
from clotho_retrieve.utils import ClothoRetrieveError


def _librosa_log_mel(y: np.ndarray, fe: FrontEnd) -> np.ndarray:
    """The reference: librosa (float64), as PANNs' torchlibrosa front end computes it."""
    mel = librosa.feature.melspectrogram(
        y=y.astype(np.float64), sr=fe.sample_rate, n_fft=fe.n_fft, hop_length=fe.hop_length,
        win_length=fe.win_length, window=fe.window, center=True, pad_mode="reflect", power=2.0,
        n_mels=fe.n_mels, fmin=fe.f_min, fmax=fe.f_max, htk=False, norm="slaney",
    )
    return (10 * np.log10(np.maximum(mel, fe.amin))).T


@pytest.mark.parametrize("preset", ["paper", "panns"])
def test_presets_match_librosa(preset):
    fe = PRESETS[preset]
    y = chirp_noise(fe.sample_rate, 1.5)
    ours = log_mel(y, fe.sample_rate, fe)
    ref = _librosa_log_mel(y, fe)
    assert ours.shape == ref.shape == (1 + len(y) // fe.hop_length, 64)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 0.05  # dB


def test_preset_values():
    paper, panns = PRESETS["paper"], PRESETS["panns"]
    assert (paper.sample_rate, paper.window, paper.n_fft, paper.hop_length) == (44100, "hamming", 1024, 512)
    assert (panns.sample_rate, panns.window, panns.n_fft, panns.hop_length) == (32000, "hann", 1024, 320)
    for fe in (paper, panns):
        assert (fe.n_mels, fe.f_min, fe.f_max) == (64, 50.0, 14000.0)
        assert (fe.mel_scale, fe.mel_norm) == ("slaney", "slaney")
        assert (fe.power, fe.amin, fe.center, fe.pad_mode) == (2.0, 1e-10, True, "reflect")


def test_resampling_keeps_a_band_limited_signal():
    """Two tones recorded at 48 kHz give the features of the same tones recorded at 44.1 kHz."""
    fe = PRESETS["paper"]

    def tones(sr):
        t = np.arange(int(sr * 1.0)) / sr
        return (0.4 * np.sin(2 * np.pi * 1000 * t) + 0.2 * np.sin(2 * np.pi * 3000 * t)).astype(np.float32)

    a, b = log_mel(tones(48000), 48000, fe)[4:-4], log_mel(tones(44100), 44100, fe)[4:-4]
    loud = b > b.max() - 40  # bands that carry the tones
    assert np.abs(a - b)[loud].max() < 0.1


def test_front_end_round_trip_and_validation():
    fe = FrontEnd(mel_norm=None, n_mels=40, f_max=8000.0)
    assert FrontEnd.from_dict(fe.to_dict()) == fe
    assert FrontEnd.from_dict({**fe.to_dict(), "mel_norm": "none", "extra": 1}) == fe
    assert fe.differences(PRESETS["paper"]) == ["n_mels: 40 != 64", "f_max: 8000.0 != 14000.0",
                                                 "mel_norm: None != 'slaney'"]
    with pytest.raises(ClothoRetrieveError, match="f_max"):
        FrontEnd(sample_rate=16000)  # f_max 14 kHz above Nyquist
    with pytest.raises(ClothoRetrieveError, match="window"):
        FrontEnd(window="blackman")


def test_log_mel_refuses_bad_waveforms():
    fe = PRESETS["paper"]
    with pytest.raises(ClothoRetrieveError, match="shorter than one window"):
        log_mel(np.zeros(1023, np.float32), 44100, fe)
    assert log_mel(np.zeros(1024, np.float32), 44100, fe).shape == (3, 64)  # silence: the amin floor
    assert np.all(log_mel(np.zeros(1024, np.float32), 44100, fe) == -100.0)
    with pytest.raises(ClothoRetrieveError, match="NaN"):
        log_mel(np.array([0.0, np.nan] * 1000, np.float32), 44100, fe)
    with pytest.raises(ClothoRetrieveError, match="mono"):
        log_mel(np.zeros((2, 4000), np.float32), 44100, fe)


@pytest.mark.parametrize("preset,sr", [("paper", 44100), ("paper", 48000), ("panns", 44100), ("panns", 8000)])
def test_block_decoding_equals_whole_file(tmp_path, preset, sr):
    """Long files are decoded in blocks; the frames equal those of the whole signal."""
    fe = PRESETS[preset]
    stereo = np.stack([chirp_noise(sr, 1.7, 1), chirp_noise(sr, 1.7, 2)], axis=1)
    path = tmp_path / "long.flac"
    sf.write(str(path), stereo, sr, subtype="PCM_24")
    whole = log_mel(sf.read(str(path), dtype="float32")[0].mean(axis=1), sr, fe)
    blocks, duration = decode_log_mel(path, fe, stream_above=1000, block=12345)  # several blocks
    assert blocks.shape == whole.shape
    assert np.abs(blocks - whole).max() < 1e-3
    assert duration == pytest.approx(len(stereo) / sr)


@pytest.mark.parametrize("changes", [
    {},
    {"mel_scale": "htk", "mel_norm": None},
    {"power": 1.0},
    {"win_length": 800, "window": "hann"},
    {"n_mels": 128, "f_min": 0.0, "f_max": 22050.0},  # every bin used, narrow low filters
])
def test_other_front_ends_match_librosa(changes):
    """Mel scales and norms, magnitude instead of power, a window shorter than the FFT, wide filter banks:
    the filter bank equals librosa.filters.mel, and the log-Mel frames librosa's."""
    import dataclasses

    from clotho_retrieve.frontend import mel_filterbank

    fe = dataclasses.replace(PRESETS["paper"], **changes)
    htk = fe.mel_scale == "htk"
    ref_filters = librosa.filters.mel(sr=fe.sample_rate, n_fft=fe.n_fft, n_mels=fe.n_mels, fmin=fe.f_min,
                                      fmax=fe.f_max, htk=htk, norm=fe.mel_norm, dtype=np.float64).T
    np.testing.assert_allclose(mel_filterbank(fe), ref_filters, rtol=1e-6, atol=1e-9)
    y = chirp_noise(fe.sample_rate, 1.0, 3)
    mel = librosa.feature.melspectrogram(
        y=y.astype(np.float64), sr=fe.sample_rate, n_fft=fe.n_fft, hop_length=fe.hop_length,
        win_length=fe.win_length, window=fe.window, center=True, pad_mode="reflect", power=fe.power,
        n_mels=fe.n_mels, fmin=fe.f_min, fmax=fe.f_max, htk=htk, norm=fe.mel_norm,
    )
    ref = (10 * np.log10(np.maximum(mel, fe.amin))).T
    ours = log_mel(y, fe.sample_rate, fe)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 0.05  # dB
