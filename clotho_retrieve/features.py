"""Log-Mel front end and the HDF5 feature cache.

The paper (Sec. III-A) feeds CNN14 with 64-band log-Mel spectrograms of whole Clotho clips at 44.1 kHz,
Hamming window, 50 % overlap. ``FrontEnd`` holds every parameter of that computation; it is stored as
attributes of each HDF5 file so that training can refuse features that do not match the model.

HDF5 layout (one file per split, or one for a folder of audio)::

    /mel          (sum_i T_i, n_mels) float32   every clip's frames, concatenated (contiguous, uncompressed)
    /offsets      (N + 1,) int64                clip i is mel[offsets[i]:offsets[i + 1]]  -> O(1) reads
    /n_frames     (N,) int64                    T_i
    /durations    (N,) float64                  seconds of the source audio
    /names        (N,) str                      file names (relative paths for --audio-dir)
    /captions     (N, K) str                    K captions per clip ("" pads; K = 0 when there are none)
    /skipped/names, /skipped/reasons  (M,) str  files left out and why
    attrs: every FrontEnd field (mel_norm None is stored as "none"), format, format_version, source, split
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clotho_retrieve.utils import ClothoRetrieveError

FORMAT = "clotho-retrieve-features"
FORMAT_VERSION = 1
SPLITS = ("development", "validation", "evaluation")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


# ----------------------------------------------------------------------------------------------
# Front end
# ----------------------------------------------------------------------------------------------
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

    def differences(self, other: FrontEnd) -> list[str]:
        """Human-readable ``field: mine != other`` lines; empty when both compute the same features."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]

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


PRESETS: dict[str, FrontEnd] = {
    # Sec. III-A of the paper: 44.1 kHz, Hamming, 1024-sample window, 50 % overlap, 64 Mel bands.
    "paper": FrontEnd(),
    # The front end CNN14 was pretrained with (PANNs' torchlibrosa: 32 kHz, Hann, hop 320).
    "panns": FrontEnd(sample_rate=32000, window="hann", hop_length=320),
}


@functools.lru_cache(maxsize=8)
def _mel_transform(front_end: FrontEnd):
    """torchaudio MelSpectrogram over already padded frames (center=False: padding is ours, see _pad)."""
    import torch
    import torchaudio

    window_fn = torch.hamming_window if front_end.window == "hamming" else torch.hann_window
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=front_end.sample_rate,
        n_fft=front_end.n_fft,
        win_length=front_end.win_length,
        hop_length=front_end.hop_length,
        f_min=front_end.f_min,
        f_max=front_end.f_max,
        n_mels=front_end.n_mels,
        window_fn=window_fn,  # torch windows are periodic by default, like librosa's fftbins=True
        power=front_end.power,
        center=False,
        norm=front_end.mel_norm,
        mel_scale=front_end.mel_scale,
    )


def _frames_to_logmel(padded: np.ndarray, front_end: FrontEnd) -> np.ndarray:
    """Padded signal -> (T, n_mels) float32 log-Mel, T = 1 + (len - n_fft) // hop."""
    import torch

    with torch.no_grad():
        mel = _mel_transform(front_end)(torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32)))
        logmel = 10.0 * torch.log10(torch.clamp(mel, min=front_end.amin))  # (n_mels, T)
    return logmel.T.contiguous().numpy()


def _resample(waveform: np.ndarray, orig: int, new: int) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    if orig == new:
        return waveform
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        return AF.resample(x, orig, new).numpy()


def _check_resample(orig: int, new: int) -> None:
    """torchaudio builds a (new, orig)-sized sinc kernel from the reduced rates: refuse absurd ones."""
    g = math.gcd(orig, new)
    if (orig // g) * (new // g) > 4_000_000:
        raise ClothoRetrieveError(
            f"sample rate {orig} Hz cannot be resampled to {new} Hz efficiently "
            "(the rates share no common factor)"
        )


def log_mel(waveform: np.ndarray, sample_rate: int, front_end: FrontEnd) -> np.ndarray:
    """Mono float waveform at any rate -> (T, n_mels) float32 log-Mel at ``front_end.sample_rate``.

    Resamples with torchaudio's band-limited sinc, pads like torch.stft / librosa (``center``,
    ``pad_mode``), then power Mel spectrogram and 10*log10(max(x, amin)) without top_db, as PANNs does.
    Raises ClothoRetrieveError for non-1-D, non-finite or too short input.
    """
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise ClothoRetrieveError(f"log_mel expects a mono 1-D waveform, got shape {waveform.shape}")
    if not np.all(np.isfinite(waveform)):
        raise ClothoRetrieveError("audio contains NaN or infinite samples")
    _check_resample(int(sample_rate), front_end.sample_rate)
    x = _resample(waveform.astype(np.float32, copy=False), int(sample_rate), front_end.sample_rate)
    if len(x) < front_end.min_samples:
        raise ClothoRetrieveError(
            f"audio is {len(x) / front_end.sample_rate:.4f} s long, shorter than one window "
            f"({front_end.min_samples} samples at {front_end.sample_rate} Hz)"
        )
    half = front_end.n_fft // 2
    if front_end.center:
        x = np.pad(x, (half, half), mode=front_end.pad_mode)
    return _frames_to_logmel(x, front_end)


class _StreamingLogMel:
    """log_mel over a signal given in consecutive blocks, in bounded memory, with the same frames.

    Two streaming stages: (1) resampling block by block, each block with enough real neighbouring
    samples on both sides (whole multiples of the reduced input rate, so the sinc kernel's phases line
    up) that its outputs equal those of resampling the whole signal; (2) framing, which keeps the
    samples of the next unfinished frame and pads the two ends exactly as log_mel does.
    """

    def __init__(self, sample_rate: int, front_end: FrontEnd, block: int = 1 << 18):
        _check_resample(sample_rate, front_end.sample_rate)
        self.fe = front_end
        self.sr = sample_rate
        g = math.gcd(sample_rate, front_end.sample_rate)
        self.o, self.n = sample_rate // g, front_end.sample_rate // g
        # torchaudio's kernel reaches `width` input samples beyond each stride of `o` samples.
        width = math.ceil(6 * self.o / (min(self.o, self.n) * 0.99))
        self.context = self.o * (math.ceil((width + self.o) / self.o) + 1)
        self.k = max(1, block // self.o)  # input block = k * o samples -> k * n output samples
        self.x = np.zeros(self.context, np.float32)  # input buffer; x[0] is input sample x_start
        self.x_start = -self.context
        self.next_in = 0  # start of the next input block to resample
        self.n_in = 0
        self.n_out = 0
        self.y = np.zeros(0, np.float32)  # framing buffer: padded-signal samples from p_start on
        self.p_start = 0
        self.head = np.zeros(0, np.float32)  # first samples, until the reflect prefix can be made
        self.tail = np.zeros(0, np.float32)  # last n_fft // 2 + 1 resampled samples, for the suffix
        self.started = not front_end.center
        self.frames: list[np.ndarray] = []

    # -- stage 1: resampling ------------------------------------------------------------------
    def push(self, block: np.ndarray) -> None:
        block = np.asarray(block, np.float32)
        self.n_in += len(block)
        if self.o == self.n:
            self._emit(block)
            return
        self.x = np.concatenate([self.x, block])
        self._resample_ready(final=False)

    def _resample_ready(self, final: bool) -> None:
        bi, c = self.k * self.o, self.context
        total_out = math.ceil(self.n * self.n_in / self.o)
        while True:
            end = self.next_in + bi + c
            if final:
                if self.n_out >= total_out:
                    break
                short = end - (self.x_start + len(self.x))
                if short > 0:
                    self.x = np.concatenate([self.x, np.zeros(short, np.float32)])
            elif self.x_start + len(self.x) < end:
                break
            seg = self.x[self.next_in - c - self.x_start : end - self.x_start]
            out = _resample(seg, self.o, self.n)
            lo = c // self.o * self.n
            out = out[lo : lo + self.k * self.n]
            if final:
                out = out[: total_out - self.n_out]
            self._emit(out)
            self.next_in += bi
            drop = self.next_in - c - self.x_start
            self.x, self.x_start = self.x[drop:], self.x_start + drop

    # -- stage 2: framing ---------------------------------------------------------------------
    def _emit(self, y: np.ndarray) -> None:
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
        if self.o != self.n:
            self._resample_ready(final=True)
        if self.n_out < self.fe.min_samples:
            raise ClothoRetrieveError(
                f"audio is {self.n_in / self.sr:.4f} s long, shorter than one window "
                f"({self.fe.min_samples} samples at {self.fe.sample_rate} Hz)"
            )
        if self.fe.center:
            half = self.fe.n_fft // 2
            self.y = np.concatenate([self.y, self.tail[-2 : -half - 2 : -1]])  # reflect suffix
            self._frame_ready()
        mel = np.concatenate(self.frames) if self.frames else np.zeros((0, self.fe.n_mels), np.float32)
        assert len(mel) == self.fe.n_frames(self.n_out), (len(mel), self.n_out)
        return mel


# ----------------------------------------------------------------------------------------------
# Reading audio files
# ----------------------------------------------------------------------------------------------
STREAM_ABOVE = 1 << 22  # frames; longer files (about 95 s at 44.1 kHz) are decoded in blocks


def _mono_blocks(sf_file, block: int) -> Iterator[np.ndarray]:
    while True:
        data = sf_file.read(block, dtype="float32", always_2d=True)
        if len(data) == 0:
            return
        yield data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]


def _checked(blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    for b in blocks:
        if not np.all(np.isfinite(b)):
            raise ClothoRetrieveError("audio contains NaN or infinite samples")
        yield b


def file_log_mel(
    path: str | os.PathLike, front_end: FrontEnd, stream_above: int = STREAM_ABOVE, block: int = 1 << 18
) -> tuple[np.ndarray, float]:
    """Decode an audio file (soundfile), mix to mono, return ((T, n_mels) log-Mel, duration in s).

    Files longer than ``stream_above`` frames are decoded and transformed block by block in bounded
    memory (same frames as the whole-file path). Every problem is a ClothoRetrieveError naming the file.
    """
    import soundfile as sf

    path = Path(path)
    try:
        with sf.SoundFile(str(path)) as f:
            sr, declared = f.samplerate, f.frames
            if declared <= 0:
                raise ClothoRetrieveError("no audio samples (empty or truncated file)")
            if declared <= stream_above:
                wave = np.concatenate(list(_checked(_mono_blocks(f, max(declared, 1)))) or [np.zeros(0)])
                n_read = len(wave)
                mel = None
            else:
                stream = _StreamingLogMel(sr, front_end, block=block)
                n_read = 0
                for b in _checked(_mono_blocks(f, block)):
                    stream.push(b)
                    n_read += len(b)
                mel = stream.finish()
        if n_read < declared:
            raise ClothoRetrieveError(f"truncated: header declares {declared} frames, only {n_read} decode")
        if mel is None:
            mel = log_mel(wave, sr, front_end)
    except ClothoRetrieveError as exc:
        raise ClothoRetrieveError(f"{path}: {exc}") from None
    except (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClothoRetrieveError(f"{path}: unreadable audio ({reason})") from None
    if not np.all(np.isfinite(mel)):  # cannot happen after the checks above; never store NaN
        raise ClothoRetrieveError(f"{path}: non-finite features")
    return mel, n_read / sr


# ----------------------------------------------------------------------------------------------
# Reading feature files
# ----------------------------------------------------------------------------------------------
def features_path(features_dir: str | os.PathLike, split: str) -> Path:
    """The HDF5 file of one Clotho split inside a features folder."""
    return Path(features_dir) / f"{split}.h5"


def _strings(ds) -> list:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[()].ravel().tolist()]


class FeatureFile:
    """Read side of one features HDF5 file: metadata in memory, clips read on demand in O(1).

    Picklable (for DataLoader workers): the HDF5 handle is opened lazily in each process.
    """

    def __init__(self, path: str | os.PathLike):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise ClothoRetrieveError(f"{self.path}: features file not found; run `clotho-retrieve features`")
        try:
            with h5py.File(self.path, "r") as h5:
                if h5.attrs.get("format") != FORMAT:
                    raise ClothoRetrieveError(
                        f"{self.path}: not a clotho-retrieve features file; re-create it with "
                        "`clotho-retrieve features`"
                    )
                self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
                self.front_end = FrontEnd.from_dict(self.attrs)
                self.names: list[str] = _strings(h5["names"])
                caps = h5["captions"]
                k = caps.shape[1]
                flat = _strings(caps) if k else []
                self.captions: list[list[str]] = [
                    [c for c in flat[i * k : (i + 1) * k] if c] for i in range(len(self.names))
                ]
                self.durations: np.ndarray = h5["durations"][()].astype(np.float64)
                self.n_frames: np.ndarray = h5["n_frames"][()].astype(np.int64)
                self.offsets: np.ndarray = h5["offsets"][()].astype(np.int64)
                self.skipped: list[tuple[str, str]] = list(
                    zip(_strings(h5["skipped/names"]), _strings(h5["skipped/reasons"]), strict=True)
                )
        except (OSError, KeyError) as exc:
            raise ClothoRetrieveError(
                f"{self.path}: unreadable features file ({exc}); delete it and re-run `features`"
            ) from None
        self._h5 = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.names)

    def _mel(self):
        import h5py

        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5["mel"]

    def __getitem__(self, i: int) -> np.ndarray:
        """(n_frames[i], n_mels) float32 log-Mel of clip i."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"clip {i} out of range for {n} clips in {self.path}")
        i %= n
        return np.asarray(self._mel()[self.offsets[i] : self.offsets[i + 1]], dtype=np.float32)

    def index(self, name: str) -> int:
        """Position of a clip by file name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ClothoRetrieveError(f"{self.path}: no clip named {name!r}") from None

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"] = None
        return state

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Writing feature files
# ----------------------------------------------------------------------------------------------
def write_feature_file(
    path: str | os.PathLike,
    names: list[str],
    mels: Iterable[np.ndarray],
    durations: list[float],
    front_end: FrontEnd,
    captions: list[list[str]] | None = None,
    skipped: list[tuple[str, str]] | None = None,
    **attrs,
) -> Path:
    """Write a complete features file atomically (temporary name, then rename); see the module docstring.

    ``mels`` is consumed once, in order; clip i must have front_end.n_mels columns.
    """
    import h5py

    from clotho_retrieve.utils import atomic_path

    path = Path(path)
    mels = list(mels) if not isinstance(mels, list) else mels
    n_frames = np.array([len(m) for m in mels], np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_frames)]).astype(np.int64)
    captions = captions if captions is not None else [[] for _ in names]
    k = max((len(c) for c in captions), default=0)
    cap = np.array([list(c) + [""] * (k - len(c)) for c in captions], dtype=object).reshape(len(names), k)
    skipped = skipped or []
    text = h5py.string_dtype("utf-8")
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        with h5py.File(tmp, "w") as h5:
            mel_ds = h5.create_dataset("mel", shape=(int(offsets[-1]), front_end.n_mels), dtype=np.float32)
            for m, a, b in zip(mels, offsets[:-1], offsets[1:], strict=True):
                if m.shape[1:] != (front_end.n_mels,):
                    raise ValueError(f"clip features of shape {m.shape}, expected (T, {front_end.n_mels})")
                if b > a:
                    mel_ds[a:b] = m
            h5.create_dataset("offsets", data=offsets)
            h5.create_dataset("n_frames", data=n_frames)
            h5.create_dataset("durations", data=np.asarray(durations, np.float64))
            h5.create_dataset("names", data=np.array(names, dtype=object), dtype=text)
            h5.create_dataset("captions", data=cap, dtype=text, shape=(len(names), k))
            for col, key in enumerate(("skipped/names", "skipped/reasons")):
                h5.create_dataset(key, data=np.array([s[col] for s in skipped], dtype=object), dtype=text)
            for key, value in front_end.to_dict().items():
                h5.attrs[key] = "none" if value is None else value
            h5.attrs["format"] = FORMAT
            h5.attrs["format_version"] = FORMAT_VERSION
            for key, value in attrs.items():
                h5.attrs[key] = value
    return path
