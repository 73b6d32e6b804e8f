"""The log-Mel front end: its parameters (``FrontEnd``, presets), the transform, decoding files into it.

The paper (Sec. III-A) feeds CNN14 with 64-band log-Mel spectrograms of whole Clotho clips at 44.1 kHz,
Hamming window, 50 % overlap. ``FrontEnd`` holds every parameter of that computation; it is stored as
attributes of each features file (feature_file.py) so that training can refuse features that do not match
the model.

``log_mel`` turns a mono waveform at any rate into (T, n_mels) frames: resampled to the front end's rate
(audio.resample, libsoxr), padded like ``torch.stft`` / librosa (``center``, ``pad_mode``), a power Mel
spectrogram, then 10*log10(max(x, amin)) without top_db, as PANNs does. ``StreamingLogMel`` computes the
same frames from a signal given in blocks, in bounded memory; ``decode_log_mel`` decodes a file
(audio.open_audio) and uses one or the other depending on its length.

The transform is written for speed on one core (the `features` stage runs one clip per process): frames
are a strided view of the padded signal, the STFT one real FFT per chunk of 128 frames (torch's MKL FFT),
the Mel filters (``mel_filterbank``, librosa's Slaney / HTK formulas in float64) applied group by group
over the FFT bins they cover. It matches librosa within 1e-4 dB on the tests' signals (0.05 dB allowed)
and the torchaudio MelSpectrogram used before within float32 rounding (~1e-3 dB), so files written
before still hold the same features for the same ``FrontEnd``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import numpy as np

from clotho_retrieve.audio import StreamResampler, open_audio, resample
from clotho_retrieve.utils import ClothoRetrieveError

STREAM_ABOVE = 1 << 22  # frames; longer files (about 95 s at 44.1 kHz) are decoded in blocks


@dataclass(frozen=True)
class FrontEnd:
    """Every parameter of the log-Mel computation (each one is stored as an HDF5 attribute)."""

    sample_rate: int = 44100
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 512
    window: str = "hamming"  # periodic window; "hamming" | "hann"
    n_mels: int = 64
    f_min: float = 50.0
    f_max: float = 14000.0
    power: float = 2.0
    mel_scale: str = "slaney"
    mel_norm: str | None = "slaney"
    center: bool = True
    pad_mode: str = "reflect"
    amin: float = 1e-10  # 10*log10(max(x, amin)), no top_db

    def __post_init__(self) -> None:
        if self.window not in ("hamming", "hann"):
            raise ClothoRetrieveError(f"front end: window must be 'hamming' or 'hann', not {self.window!r}")
        if self.win_length > self.n_fft:
            raise ClothoRetrieveError(f"front end: win_length {self.win_length} exceeds n_fft {self.n_fft}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise ClothoRetrieveError(
                f"front end: need 0 <= f_min < f_max <= sample_rate / 2, got f_min {self.f_min}, "
                f"f_max {self.f_max}, sample_rate {self.sample_rate}"
            )
        if self.hop_length <= 0 or self.n_mels <= 0:
            raise ClothoRetrieveError("front end: hop_length and n_mels must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FrontEnd:
        """Build from a dict (JSON or HDF5 attributes); unknown keys are ignored, "none" means None."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in d.items():
            if key not in known:
                continue
            if isinstance(value, bytes):
                value = value.decode()
            if isinstance(value, np.generic):
                value = value.item()
            if key == "mel_norm" and value in ("none", "", None):
                value = None
            elif key in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels"):
                value = int(value)
            elif key in ("f_min", "f_max", "power", "amin"):
                value = float(value)
            elif key == "center":
                value = bool(value)
            kwargs[key] = value
        return cls(**kwargs)

    def differences(self, other) -> list[str]:
        """Human-readable ``field: mine != other`` lines; empty when both compute the same features."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b.get(k)!r}" for k in a if a[k] != b.get(k)]

    def file_features(self, path: str | os.PathLike) -> tuple[np.ndarray, float]:
        """Decode one audio file -> ((T, n_mels) log-Mel, duration in s): the features stage's per-file
        function (errors carry the reason only; ClapFrontEnd offers the same method)."""
        return decode_log_mel(path, self)

    @property
    def min_samples(self) -> int:
        """Shortest signal (at ``sample_rate``) that yields one full frame."""
        if self.center:  # reflect padding needs more than n_fft // 2 samples
            return max(self.win_length, self.n_fft // 2 + 1)
        return self.n_fft

    def n_frames(self, n_samples: int) -> int:
        """Frames of a signal of ``n_samples`` at ``sample_rate`` (torch.stft's count)."""
        if self.center:
            return 1 + n_samples // self.hop_length
        return 1 + (n_samples - self.n_fft) // self.hop_length


def front_end_from_dict(d: dict):
    """The front end a dict describes (JSON, HDF5 attributes): a :class:`clotho_retrieve.clap.ClapFrontEnd`
    when its preset is "clap" (a pretrained CLAP model's input), else a log-Mel :class:`FrontEnd`.

    Use it wherever a stored front end is read back: ``FrontEnd.from_dict`` on a CLAP dict would
    silently build a log-Mel front end from the fields the two share.
    """
    from clotho_retrieve.clap import ClapFrontEnd, is_clap_front_end

    return ClapFrontEnd.from_dict(d) if is_clap_front_end(d) else FrontEnd.from_dict(d)


PRESETS: dict[str, FrontEnd] = {
    # Sec. III-A of the paper: 44.1 kHz, Hamming, 1024-sample window, 50 % overlap, 64 Mel bands.
    "paper": FrontEnd(),
    # The front end CNN14 was pretrained with (PANNs' torchlibrosa: 32 kHz, Hann, hop 320).
    "panns": FrontEnd(sample_rate=32000, window="hann", hop_length=320),
}


# ----------------------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------------------
def _hz_to_mel(f: np.ndarray, scale: str) -> np.ndarray:
    """Hz -> Mel: HTK's 2595 log10(1 + f / 700), or Slaney's (linear below 1 kHz, logarithmic above)."""
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    f = np.asarray(f, np.float64)
    logstep = np.log(6.4) / 27.0  # Slaney's Auditory Toolbox: 27 log-spaced bands per factor 6.4
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) / logstep, f * 3.0 / 200.0)


def _mel_to_hz(m: np.ndarray, scale: str) -> np.ndarray:
    """The inverse of ``_hz_to_mel``."""
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), m * 200.0 / 3.0)


def mel_filterbank(front_end: FrontEnd) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) float32 triangular Mel filters W (librosa.filters.mel's, transposed).

    n_mels + 2 points equally spaced on the Mel scale between f_min and f_max give the corners of
    triangle m: rising from f[m] to f[m + 1], falling to f[m + 2]; "slaney" norm scales each to unit area
    (2 / (f[m + 2] - f[m])). Computed in float64, rounded once to float32.
    """
    fe = front_end
    if fe.mel_scale not in ("slaney", "htk") or fe.mel_norm not in (None, "slaney"):
        raise ClothoRetrieveError(
            f"front end: mel_scale must be 'slaney' or 'htk' and mel_norm 'slaney' or none, got "
            f"{fe.mel_scale!r} and {fe.mel_norm!r}"
        )
    freqs = np.arange(fe.n_fft // 2 + 1) * (fe.sample_rate / fe.n_fft)  # bin centres (Hz)
    mels = np.linspace(_hz_to_mel(np.float64(fe.f_min), fe.mel_scale),
                       _hz_to_mel(np.float64(fe.f_max), fe.mel_scale), fe.n_mels + 2)
    corners = _mel_to_hz(mels, fe.mel_scale)  # (n_mels + 2,)
    rising = (freqs[:, None] - corners[None, :-2]) / np.diff(corners)[None, :-1]
    falling = (corners[None, 2:] - freqs[:, None]) / np.diff(corners)[None, 1:]
    weights = np.maximum(0.0, np.minimum(rising, falling))  # (n_freqs, n_mels)
    if fe.mel_norm == "slaney":
        weights *= 2.0 / (corners[2:] - corners[:-2])[None, :]
    return weights.astype(np.float32)


def stft_window(front_end: FrontEnd) -> np.ndarray:
    """(n_fft,) float32 periodic Hamming or Hann window of win_length, zero-padded at both ends to n_fft
    (torch.stft's and librosa's placement): w[n] = a - (1 - a) cos(2 pi n / win_length), a = 0.54 / 0.5."""
    a = 0.54 if front_end.window == "hamming" else 0.5
    n = np.arange(front_end.win_length)
    window = np.zeros(front_end.n_fft)
    left = (front_end.n_fft - front_end.win_length) // 2
    window[left : left + len(n)] = a - (1.0 - a) * np.cos(2.0 * np.pi * n / front_end.win_length)
    return window.astype(np.float32)


MEL_GROUP = 16  # Mel filters multiplied together: neighbours share a narrow range of FFT bins


@functools.lru_cache(maxsize=8)
def _tables(front_end: FrontEnd):
    """The transform's constants as torch tensors: the window; the bins [k0, k1) that any filter uses;
    and W cut into groups of MEL_GROUP consecutive filters (m0, m1, lo, hi, W[lo:hi, m0:m1]), each with
    only the bins its filters cover (a triangular filter bank is banded: about 4x fewer multiplications
    than one dense product, the same sums, since the terms left out are zeros)."""
    import torch

    weights = mel_filterbank(front_end)  # (n_freqs, n_mels)
    used = np.flatnonzero(weights.any(axis=1))
    k0, k1 = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 1)
    groups = []
    for m0 in range(0, front_end.n_mels, MEL_GROUP):
        m1 = min(m0 + MEL_GROUP, front_end.n_mels)
        rows = np.flatnonzero(weights[:, m0:m1].any(axis=1))
        if len(rows):  # (a group of empty filters stays 0)
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            block = torch.from_numpy(np.ascontiguousarray(weights[lo:hi, m0:m1]))  # (hi - lo, m1 - m0)
            groups.append((m0, m1, lo - k0, hi - k0, block))
    return torch.from_numpy(stft_window(front_end)), k0, k1, groups


FRAME_CHUNK = 128  # frames transformed together: a chunk of frames and its spectrum stay in cache


def _frames_to_logmel(padded: np.ndarray, front_end: FrontEnd) -> np.ndarray:
    """Padded signal -> (T, n_mels) float32 log-Mel, T = 1 + (len - n_fft) // hop.

    Frame t is padded[t hop : t hop + n_fft] (a strided view, no copy). Per chunk of frames, the STFT
    X_t = rfft(w x_t) and its power |X_t|^2 = re^2 + im^2 over the bins the filters use; then the Mel
    spectrogram M = P W with P = (|X|^2)^(power / 2) (float32 products, group by group), and
    10 log10(max(M, amin)) in place. torch's MKL real FFT is the fastest single-thread one at hand
    (scipy.fft and numpy.fft take 2-3x longer on 1024-point float32 rows).
    """
    import torch

    fe = front_end
    window, k0, k1, groups = _tables(fe)
    signal = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))
    frames = signal.unfold(0, fe.n_fft, fe.hop_length)  # (T, n_fft) view
    power = torch.empty((len(frames), k1 - k0), dtype=torch.float32)  # (T, K)
    mel = torch.zeros((len(frames), fe.n_mels), dtype=torch.float32)  # (T, n_mels)
    with torch.no_grad():
        for a in range(0, len(frames), FRAME_CHUNK):
            spectrum = torch.fft.rfft(frames[a : a + FRAME_CHUNK] * window, dim=1)  # (c, n_fft // 2 + 1)
            re_im = torch.view_as_real(spectrum)[:, k0:k1].square_()  # (c, K, 2)
            torch.add(re_im[..., 0], re_im[..., 1], out=power[a : a + FRAME_CHUNK])
        if fe.power != 2.0:
            power.pow_(fe.power / 2.0)
        for m0, m1, lo, hi, weights in groups:
            torch.matmul(power[:, lo:hi], weights, out=mel[:, m0:m1])
        mel.clamp_(min=fe.amin).log10_().mul_(10.0)
    return mel.numpy()


def _too_short(seconds: float, front_end: FrontEnd) -> ClothoRetrieveError:
    return ClothoRetrieveError(
        f"audio is {seconds:.4f} s long, shorter than one window "
        f"({front_end.min_samples} samples at {front_end.sample_rate} Hz)"
    )


def log_mel(waveform: np.ndarray, sample_rate: int, front_end: FrontEnd) -> np.ndarray:
    """Mono float waveform at any rate -> (T, n_mels) float32 log-Mel at ``front_end.sample_rate``.

    Resamples (audio.resample), pads like torch.stft / librosa (``center``, ``pad_mode``), then power Mel
    spectrogram and 10*log10(max(x, amin)) without top_db, as PANNs does.
    Raises ClothoRetrieveError for non-1-D, non-finite or too short input.
    """
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise ClothoRetrieveError(f"log_mel expects a mono 1-D waveform, got shape {waveform.shape}")
    if not np.all(np.isfinite(waveform)):
        raise ClothoRetrieveError("audio contains NaN or infinite samples")
    x = resample(waveform.astype(np.float32, copy=False), int(sample_rate), front_end.sample_rate)
    if len(x) < front_end.min_samples:
        raise _too_short(len(x) / front_end.sample_rate, front_end)
    if front_end.center:
        x = _pad(x, front_end.n_fft // 2, front_end.pad_mode)
    return _frames_to_logmel(x, front_end)


def _pad(x: np.ndarray, half: int, mode: str) -> np.ndarray:
    """np.pad(x, (half, half), mode); "reflect" written out (one copy of x instead of np.pad's several)."""
    if mode != "reflect" or len(x) <= half:
        return np.pad(x, (half, half), mode=mode)
    out = np.empty(len(x) + 2 * half, np.float32)
    out[half : half + len(x)] = x
    return _reflect_margins(out, half)


def _reflect_margins(out: np.ndarray, half: int) -> np.ndarray:
    """Fill the first and last ``half`` samples of ``out`` by reflecting the signal between them, as
    np.pad(signal, half, "reflect"): x[half], ..., x[1] before, x[-2], ..., x[-half - 1] after."""
    x = out[half : len(out) - half]
    out[:half] = x[half:0:-1]
    out[len(out) - half :] = x[-2 : -half - 2 : -1]
    return out


def _decoded_log_mel(audio, front_end: FrontEnd) -> np.ndarray:
    """log_mel of a whole open file (audio.AudioFile). At the front end's rate with reflect padding, the
    signal is decoded straight into its padded array (the same frames as log_mel, one copy less)."""
    fe = front_end
    if audio.sample_rate != fe.sample_rate or not fe.center or fe.pad_mode != "reflect":
        return log_mel(audio.read_all(), audio.sample_rate, fe)
    half = fe.n_fft // 2
    padded = audio.read_all(margin=half)  # finite: read_all checks what it decodes
    if len(padded) - 2 * half < fe.min_samples:
        raise _too_short((len(padded) - 2 * half) / fe.sample_rate, fe)
    return _frames_to_logmel(_reflect_margins(padded, half), fe)


class StreamingLogMel:
    """log_mel over a signal given in consecutive blocks, in bounded memory, with the same frames.

    Two streaming stages: (1) resampling (audio.StreamResampler, the same samples as resampling the whole
    signal); (2) framing, which keeps the samples of the next unfinished frame and pads the two ends
    exactly as log_mel does. push() each block, then finish() once for the (T, n_mels) frames.
    """

    def __init__(self, sample_rate: int, front_end: FrontEnd):
        self.fe = front_end
        self.sr = sample_rate
        self.resampler = StreamResampler(sample_rate, front_end.sample_rate)
        self.n_in = 0  # input samples pushed
        self.n_out = 0  # resampled samples produced
        self.y = np.zeros(0, np.float32)  # framing buffer: padded-signal samples not yet framed
        self.head = np.zeros(0, np.float32)  # first samples, until the reflect prefix can be made
        self.tail = np.zeros(0, np.float32)  # last n_fft // 2 + 1 resampled samples, for the suffix
        self.started = not front_end.center
        self.frames: list[np.ndarray] = []

    def push(self, block: np.ndarray) -> None:
        self.n_in += len(block)
        self._emit(self.resampler.push(block))

    def _emit(self, y: np.ndarray) -> None:
        """Take resampled samples: pad the start once (reflect prefix), frame what is complete."""
        self.n_out += len(y)
        half = self.fe.n_fft // 2
        self.tail = np.concatenate([self.tail, y])[-(half + 1) :]
        if not self.started:
            self.head = np.concatenate([self.head, y])
            if len(self.head) <= half:
                return
            y = np.concatenate([self.head[half:0:-1], self.head])  # reflect prefix (np.pad 'reflect')
            self.head, self.started = np.zeros(0, np.float32), True
        self.y = np.concatenate([self.y, y])
        self._frame_ready()

    def _frame_ready(self) -> None:
        hop, n_fft = self.fe.hop_length, self.fe.n_fft
        n = (len(self.y) - n_fft) // hop + 1 if len(self.y) >= n_fft else 0
        if n > 0:
            self.frames.append(_frames_to_logmel(self.y[: (n - 1) * hop + n_fft], self.fe))
            self.y = self.y[n * hop :]

    def finish(self) -> np.ndarray:
        self._emit(self.resampler.finish())
        if self.n_out < self.fe.min_samples:
            raise _too_short(self.n_in / self.sr, self.fe)
        if self.fe.center:
            half = self.fe.n_fft // 2
            self.y = np.concatenate([self.y, self.tail[-2 : -half - 2 : -1]])  # reflect suffix
            self._frame_ready()
        mel = np.concatenate(self.frames) if self.frames else np.zeros((0, self.fe.n_mels), np.float32)
        assert len(mel) == self.fe.n_frames(self.n_out), (len(mel), self.n_out)
        return mel


# ----------------------------------------------------------------------------------------------
# Audio files
# ----------------------------------------------------------------------------------------------
def decode_log_mel(
    path: str | os.PathLike, front_end: FrontEnd, stream_above: int = STREAM_ABOVE, block: int = 1 << 18
) -> tuple[np.ndarray, float]:
    """Decode an audio file (audio.open_audio), mix to mono, return ((T, n_mels) log-Mel, duration in s).

    Files longer than ``stream_above`` frames are decoded and transformed block by block in bounded
    memory (same frames as the whole-file path). Problems raise ClothoRetrieveError with the reason only
    (file_log_mel adds the file name).
    """
    with open_audio(path) as audio:
        if audio.frames <= stream_above:
            mel = _decoded_log_mel(audio, front_end)
        else:
            stream = StreamingLogMel(audio.sample_rate, front_end)
            for b in audio.blocks(block):
                stream.push(b)
            audio.check_complete()
            mel = stream.finish()
    if not np.all(np.isfinite(mel)):  # cannot happen after the checks above; never store NaN
        raise ClothoRetrieveError("non-finite features")
    return mel, audio.duration


def file_log_mel(path: str | os.PathLike, front_end: FrontEnd) -> tuple[np.ndarray, float]:
    """decode_log_mel with the file name in every error message (for one-off files, e.g. query by example)."""
    try:
        return decode_log_mel(path, front_end)
    except ClothoRetrieveError as exc:
        raise ClothoRetrieveError(f"{path}: {exc}") from None
