"""Reading audio (mono blocks, truncation) and resampling (soxr) against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from audio_signals import chirp_noise

from clotho_retrieve.audio import StreamResampler, audio_files, open_audio, resample
from clotho_retrieve.utils import ClothoRetrieveError

RATES = [(48000, 44100), (44100, 32000), (8000, 32000), (22050, 32000)]


@pytest.mark.parametrize("orig,new,freq", [(48000, 44100, 1000.0), (44100, 32000, 3000.0),
                                           (8000, 32000, 440.0), (22050, 32000, 5000.0)])
def test_resampled_tone_is_the_same_tone_at_the_new_rate(orig, new, freq):
    """A 1 s sine resampled equals sin(2 pi f n / new): same amplitude, frequency and phase (no delay).

    Tolerance 1e-5: libsoxr's "HQ" recipe is accurate to 20 bits (2**-20 ~ 1e-6 of full scale; we see
    < 1e-6); the first and last 10 % are left out, where the filter meets the signal's edges.
    """
    x = np.sin(2 * np.pi * freq * np.arange(orig) / orig).astype(np.float32)
    y = resample(x, orig, new)
    assert y.dtype == np.float32 and len(y) == new
    ref = np.sin(2 * np.pi * freq * np.arange(new) / new)
    mid = slice(new // 10, new - new // 10)
    assert np.abs(y[mid] - ref[mid]).max() < 1e-5


def test_resampling_removes_tones_above_the_new_nyquist():
    x = np.sin(2 * np.pi * 20000 * np.arange(44100) / 44100).astype(np.float32)  # 20 kHz > 16 kHz
    y = resample(x, 44100, 32000)
    assert np.abs(y[3200:-3200]).max() < 1e-5  # below -100 dB (the HQ stop band is > 120 dB down)


def test_same_rate_is_left_alone():
    x = chirp_noise(44100, 0.1)
    assert resample(x, 44100, 44100) is x
    stream = StreamResampler(44100, 44100)
    assert np.array_equal(np.concatenate([stream.push(x[:1000]), stream.push(x[1000:]), stream.finish()]), x)


@pytest.mark.parametrize("orig,new", RATES)
@pytest.mark.parametrize("block", [1, 13, 4096, 1 << 18])
def test_streamed_resampling_equals_the_whole_signal(orig, new, block):
    """Block by block, any block size, the same samples as one call over the whole signal.

    libsoxr queues its input and filters fixed-size blocks of its own, so the arithmetic does not depend
    on how the input is cut: the samples are identical in practice. The 1e-6 bound (a few float32 ulps of
    a signal below 1) only leaves room for a libsoxr build whose vector kernels round differently.
    """
    x = chirp_noise(orig, 0.3 if block > 1 else 0.05, seed=block)
    whole = resample(x, orig, new)
    stream = StreamResampler(orig, new)
    pieces = [stream.push(x[i : i + block]) for i in range(0, len(x), block)]
    streamed = np.concatenate(pieces + [stream.finish()])
    assert streamed.dtype == np.float32 and len(streamed) == len(whole)
    assert np.abs(streamed - whole).max() <= 1e-6


def test_blocks_are_mono_means_and_truncation_is_caught(tmp_path):
    stereo = np.stack([chirp_noise(16000, 0.5, 1), chirp_noise(16000, 0.5, 2)], axis=1)
    sf.write(str(tmp_path / "s.wav"), stereo, 16000, subtype="FLOAT")
    with open_audio(tmp_path / "s.wav") as audio:
        assert (audio.sample_rate, audio.frames) == (16000, 8000)
        blocks = list(audio.blocks(3000))
        audio.check_complete()
    assert [len(b) for b in blocks] == [3000, 3000, 2000]
    np.testing.assert_allclose(np.concatenate(blocks), stereo.mean(axis=1), atol=1e-7)
    assert audio.duration == 0.5
    whole = (tmp_path / "s.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ClothoRetrieveError, match="truncated"), open_audio(tmp_path / "cut.wav") as audio:
        audio.read_all()
    (tmp_path / "bad.wav").write_text("not audio")
    with pytest.raises(ClothoRetrieveError, match="unreadable audio"), open_audio(tmp_path / "bad.wav"):
        pass


def test_audio_files_are_listed_recursively(tmp_path):
    for name in ("b.wav", "sub/a.FLAC", "sub/deeper/c.mp3", "notes.txt", "sub/d.ogg.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in audio_files(tmp_path)]
    assert found == ["b.wav", "sub/a.FLAC", "sub/deeper/c.mp3"]
