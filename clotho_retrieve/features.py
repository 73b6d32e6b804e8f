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
    /source_size, /source_mtime_ns  (N,) int64  the source file's size and st_mtime_ns when it was computed
    /skipped/names, /skipped/reasons  (M,) str  files left out and why
    /skipped/source_size, /skipped/source_mtime_ns  (M,) int64   same, -1 for problems found before decoding
    attrs: every FrontEnd field (mel_norm None is stored as "none"), format, format_version, source, split

Format version 2 added the source_* datasets (what lets a re-run reuse unchanged clips); version 1 files
are still read, with every size and mtime unknown (-1), so nothing of theirs is reused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clotho_retrieve.utils import ClothoRetrieveError

FORMAT = "clotho-retrieve-features"
FORMAT_VERSION = 2  # 2: /source_size, /source_mtime_ns (incremental updates)
UNKNOWN = -1  # size / mtime of a source never stat'ed (format version 1, problems found before decoding)
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


def _truncated_wav(info: str) -> str | None:
    """libsndfile logs 'data : N (should be M)' for a WAV whose data chunk runs past the file's end."""
    m = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", info, re.M)
    if m and int(m.group(1)) > int(m.group(2)):
        return f"truncated: data chunk declares {m.group(1)} bytes, the file holds {m.group(2)}"
    return None


def decode_log_mel(
    path: str | os.PathLike, front_end: FrontEnd, stream_above: int = STREAM_ABOVE, block: int = 1 << 18
) -> tuple[np.ndarray, float]:
    """Decode an audio file (soundfile), mix to mono, return ((T, n_mels) log-Mel, duration in s).

    Files longer than ``stream_above`` frames are decoded and transformed block by block in bounded
    memory (same frames as the whole-file path). Problems raise ClothoRetrieveError with the reason only
    (file_log_mel adds the file name).
    """
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as f:
            sr, declared = f.samplerate, f.frames
            if reason := _truncated_wav(f.extra_info):
                raise ClothoRetrieveError(reason)
            if declared <= 0:
                raise ClothoRetrieveError("no audio samples (empty or truncated file)")
            if declared <= stream_above:
                wave = np.concatenate(list(_checked(_mono_blocks(f, declared))) or [np.zeros(0, np.float32)])
                n_read, mel = len(wave), None
            else:
                stream, n_read = _StreamingLogMel(sr, front_end, block=block), 0
                for b in _checked(_mono_blocks(f, block)):
                    stream.push(b)
                    n_read += len(b)
                mel = stream.finish() if n_read >= declared else None
        if n_read < declared:
            raise ClothoRetrieveError(f"truncated: header declares {declared} frames, only {n_read} decode")
        if mel is None:
            mel = log_mel(wave, sr, front_end)
    except ClothoRetrieveError:
        raise
    except sf.LibsndfileError as exc:
        if os.path.getsize(path) == 0:
            raise ClothoRetrieveError("empty file") from None
        detail = exc.error_string.strip()
        if "does not exist" in detail:  # what libsndfile says of an undecodable MP3
            detail = "not a recognised audio format"
        raise ClothoRetrieveError(f"unreadable audio ({detail})") from None
    except (RuntimeError, ValueError, TypeError, OSError) as exc:
        raise ClothoRetrieveError(f"unreadable audio ({type(exc).__name__}: {exc})") from None
    if not np.all(np.isfinite(mel)):  # cannot happen after the checks above; never store NaN
        raise ClothoRetrieveError("non-finite features")
    return mel, n_read / sr


def file_log_mel(path: str | os.PathLike, front_end: FrontEnd) -> tuple[np.ndarray, float]:
    """decode_log_mel with the file name in every error message (for one-off files, e.g. query by example)."""
    try:
        return decode_log_mel(path, front_end)
    except ClothoRetrieveError as exc:
        raise ClothoRetrieveError(f"{path}: {exc}") from None


# ----------------------------------------------------------------------------------------------
# Reading feature files
# ----------------------------------------------------------------------------------------------
def features_path(features_dir: str | os.PathLike, split: str) -> Path:
    """The HDF5 file of one Clotho split inside a features folder."""
    return Path(features_dir) / f"{split}.h5"


def _strings(ds) -> list:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[()].ravel().tolist()]


def _sources(h5, group: str, n: int) -> np.ndarray:
    """(n, 2) int64 [size, mtime_ns] from ``group``source_size / source_mtime_ns, UNKNOWN when absent."""
    if f"{group}source_size" not in h5:
        return np.full((n, 2), UNKNOWN, np.int64)
    size, mtime_ns = h5[f"{group}source_size"][()], h5[f"{group}source_mtime_ns"][()]
    return np.stack([size, mtime_ns], axis=1).astype(np.int64)


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
                if int(h5.attrs.get("format_version", 0)) > FORMAT_VERSION:
                    raise ClothoRetrieveError(
                        f"{self.path}: written by a newer clotho-retrieve (format version "
                        f"{h5.attrs['format_version']}); upgrade, or re-run `clotho-retrieve features`"
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
                # (size, mtime_ns) of each source when computed; UNKNOWN in files of format version 1
                self.sources: np.ndarray = _sources(h5, "", len(self.names))  # (N, 2) int64
                self.skipped_sources: np.ndarray = _sources(h5, "skipped/", len(self.skipped))  # (M, 2)
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
    n_frames: list[int] | None = None,
    sources: np.ndarray | None = None,
    skipped_sources: np.ndarray | None = None,
    **attrs,
) -> Path:
    """Write a complete features file atomically (temporary name, then rename); see the module docstring.

    ``mels`` is consumed once, in order; clip i must have front_end.n_mels columns. With ``n_frames``
    given, ``mels`` may be a lazy iterator (bounded memory). ``sources`` / ``skipped_sources``: (N, 2) and
    (M, 2) [size, mtime_ns] of the source files (UNKNOWN = -1 when not given: never reused by a re-run).
    """
    import h5py

    from clotho_retrieve.utils import atomic_path

    path = Path(path)
    if n_frames is None:
        mels = list(mels)
        n_frames = [len(m) for m in mels]
    n_frames = np.asarray(n_frames, np.int64).reshape(len(names))
    offsets = np.concatenate([[0], np.cumsum(n_frames)]).astype(np.int64)
    captions = captions if captions is not None else [[] for _ in names]
    k = max((len(c) for c in captions), default=0)
    cap = np.array([list(c) + [""] * (k - len(c)) for c in captions], dtype=object).reshape(len(names), k)
    skipped = skipped or []
    sources = _source_array(sources, len(names))
    skipped_sources = _source_array(skipped_sources, len(skipped))
    text = h5py.string_dtype("utf-8")
    with atomic_path(path, suffix=".h5.tmp") as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with h5py.File(tmp, "w") as h5:
            mel_ds = h5.create_dataset("mel", shape=(int(offsets[-1]), front_end.n_mels), dtype=np.float32)
            for m, a, b in zip(mels, offsets[:-1], offsets[1:], strict=True):
                if m.shape != (b - a, front_end.n_mels):
                    raise ValueError(f"clip features {m.shape}, expected ({b - a}, {front_end.n_mels})")
                if b > a:
                    mel_ds[a:b] = m
            h5.create_dataset("offsets", data=offsets)
            h5.create_dataset("n_frames", data=n_frames)
            h5.create_dataset("durations", data=np.asarray(durations, np.float64))
            h5.create_dataset("names", data=np.array(names, dtype=object), dtype=text)
            h5.create_dataset("captions", data=cap, dtype=text, shape=(len(names), k))
            for col, key in enumerate(("skipped/names", "skipped/reasons")):
                h5.create_dataset(key, data=np.array([s[col] for s in skipped], dtype=object), dtype=text)
            for group, src in (("", sources), ("skipped/", skipped_sources)):
                h5.create_dataset(f"{group}source_size", data=src[:, 0])
                h5.create_dataset(f"{group}source_mtime_ns", data=src[:, 1])
            for key, value in front_end.to_dict().items():
                h5.attrs[key] = "none" if value is None else value
            h5.attrs["format"] = FORMAT
            h5.attrs["format_version"] = FORMAT_VERSION
            for key, value in attrs.items():
                h5.attrs[key] = value
    return path


def _source_array(sources, n: int) -> np.ndarray:
    if sources is None:
        return np.full((n, 2), UNKNOWN, np.int64)
    return np.asarray(sources, np.int64).reshape(n, 2)


# ----------------------------------------------------------------------------------------------
# The `features` stage: jobs, resumable shards, parallel workers, assembly
# ----------------------------------------------------------------------------------------------
@dataclass
class FeaturesConfig:
    """Settings of one `features` run (saved as features_config.json beside the output)."""

    preset: str = "paper"
    overrides: dict = dataclasses.field(default_factory=dict)  # FrontEnd fields that replace the preset's
    workers: int = 0  # 0: all cores
    strict: bool = False

    def front_end(self) -> FrontEnd:
        if self.preset not in PRESETS:
            raise ClothoRetrieveError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[self.preset], **self.overrides)


@dataclass
class Job:
    """One output HDF5 file: the clips to compute, in order, and the problems found before decoding."""

    out: Path
    names: list[str]
    paths: list[Path]
    captions: list[list[str]]
    skipped: list[tuple[str, str]]
    attrs: dict


def _read_captions(csv_path: Path) -> list[tuple[str, list[str]]]:
    import csv

    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "file_name" not in reader.fieldnames:
                raise ClothoRetrieveError(f"{csv_path}: no 'file_name' column; not a Clotho captions CSV")
            cols = sorted((c for c in reader.fieldnames if c.startswith("caption")), key=_caption_index)
            return [(row["file_name"], [(row[c] or "").strip() for c in cols if (row[c] or "").strip()])
                    for row in reader]
    except (UnicodeDecodeError, OSError) as exc:
        raise ClothoRetrieveError(f"{csv_path}: unreadable captions CSV ({exc})") from None


def _caption_index(col: str) -> int:
    digits = re.sub(r"\D", "", col)
    return int(digits) if digits else 0


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def clotho_jobs(
    root: str | os.PathLike, out_dir: str | os.PathLike, splits: list[str] | None = None
) -> list[Job]:
    """One job per split of a Clotho-layout root (split folders + clotho_captions_{split}.csv)."""
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise ClothoRetrieveError(f"{root}: not a folder; pass the Clotho root (with development/ ...)")
    found = [s for s in SPLITS if (root / s).is_dir() or (root / f"clotho_captions_{s}.csv").is_file()]
    for s in splits or []:
        if s not in SPLITS:
            raise ClothoRetrieveError(f"unknown --split {s!r}; choose from {', '.join(SPLITS)}")
        if s not in found:
            raise ClothoRetrieveError(f"{root / s}: split not found (no folder and no captions CSV)")
    if not found:
        raise ClothoRetrieveError(
            f"{root}: no Clotho split found (expected development/, validation/ or evaluation/ with "
            "clotho_captions_<split>.csv); run `clotho-retrieve download` or `demo-data`"
        )
    jobs = []
    for split in splits or found:
        folder, csv_path = root / split, root / f"clotho_captions_{split}.csv"
        on_disk = {p.name: p for p in (folder.iterdir() if folder.is_dir() else []) if p.is_file()}
        names, paths, captions, skipped, seen = [], [], [], [], set()
        if csv_path.is_file():
            for name, caps in _read_captions(csv_path):
                if name in seen:
                    skipped.append((name, f"duplicated file name in {csv_path.name}"))
                elif name not in on_disk:
                    skipped.append((name, f"listed in {csv_path.name} but missing from {split}/"))
                else:
                    names.append(name)
                    paths.append(on_disk[name])
                    captions.append(caps)
                seen.add(name)
            for name in sorted(set(on_disk) - seen):
                if Path(name).suffix.lower() in AUDIO_SUFFIXES:
                    skipped.append((name, f"no caption row in {csv_path.name}"))
        else:  # a split without captions: every audio file of its folder
            for p in _audio_files(folder):
                names.append(p.relative_to(folder).as_posix())
                paths.append(p)
                captions.append([])
        jobs.append(Job(features_path(out_dir, split), names, paths, captions, skipped,
                        {"split": split, "source": str(root.resolve())}))
    return jobs


def audio_dir_job(audio_dir: str | os.PathLike, out: str | os.PathLike) -> Job:
    """One job for every audio file under a folder (recursively); names are relative paths."""
    audio_dir = Path(audio_dir)
    if not audio_dir.is_dir():
        raise ClothoRetrieveError(f"{audio_dir}: not a folder")
    paths = _audio_files(audio_dir)
    names = [p.relative_to(audio_dir).as_posix() for p in paths]
    attrs = {"split": "", "source": str(audio_dir.resolve())}
    return Job(Path(out), names, paths, [[] for _ in names], [], attrs)


def _work_dir(out: Path, front_end: FrontEnd) -> Path:
    """Shard folder beside the output, specific to the front end (a changed front end starts afresh)."""
    import hashlib
    import json

    digest = hashlib.sha1(json.dumps(front_end.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return out.parent / f".{out.name}.{digest}.work"


def _shard_name(name: str) -> str:
    import hashlib

    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:20]


def _signature(path: Path) -> np.ndarray:
    """[size, st_mtime_ns] of a source file: what tells a re-run that the file changed."""
    st = path.stat()
    return np.array([st.st_size, st.st_mtime_ns], np.int64)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one clip per process; processes give the parallelism


def _compute_shard(name: str, path: Path, work: Path, front_end: FrontEnd) -> tuple[str, str | None]:
    """Compute one clip and save its shard atomically: <hash>.npz (features) or <hash>.skip (reason).

    Both record the source's signature taken before decoding, so a file changed meanwhile is redone.
    """
    import json

    from clotho_retrieve.utils import atomic_path

    key = _shard_name(name)
    signature = np.full(2, UNKNOWN, np.int64)
    try:
        signature = _signature(path)
        mel, duration = decode_log_mel(path, front_end)
    except ClothoRetrieveError as exc:
        reason = str(exc)
    except Exception as exc:  # never let one file end the run; report it in the skip table
        reason = f"failed ({type(exc).__name__}: {exc})"
    else:
        with atomic_path(work / f"{key}.npz", suffix=".part") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, mel=mel, duration=np.float64(duration), signature=signature)
        (work / f"{key}.skip").unlink(missing_ok=True)  # an older version of the file was unreadable
        return name, None
    with atomic_path(work / f"{key}.skip", suffix=".part") as tmp:
        record = {"name": name, "reason": reason, "signature": signature.tolist()}
        tmp.write_text(json.dumps(record), encoding="utf-8")
    (work / f"{key}.npz").unlink(missing_ok=True)
    return name, reason


def _finished(name: str, path: Path, work: Path) -> tuple[bool, str | None]:
    """(done, skip reason) from an existing shard; a shard of an older version of the file is redone."""
    import json

    key = _shard_name(name)
    try:
        now = _signature(path)
    except OSError:
        return False, None  # gone since the listing: computing it records why
    for shard in (work / f"{key}.skip", work / f"{key}.npz"):
        if not shard.is_file():
            continue
        try:
            if shard.suffix == ".skip":
                record = json.loads(shard.read_text(encoding="utf-8"))
                return (True, record["reason"]) if record.get("signature") == now.tolist() else (False, None)
            with np.load(shard, allow_pickle=False) as z:
                return bool(np.array_equal(z["signature"], now)), None
        except (OSError, ValueError, KeyError):
            shard.unlink()
    return False, None


def _shard(work: Path, name: str) -> tuple[np.ndarray | None, float, np.ndarray, str | None]:
    """(mel or None, duration, signature, skip reason) of a finished clip's shard."""
    import json

    key = _shard_name(name)
    if (work / f"{key}.skip").is_file():
        record = json.loads((work / f"{key}.skip").read_text(encoding="utf-8"))
        return None, 0.0, np.asarray(record["signature"], np.int64), record["reason"]
    with np.load(work / f"{key}.npz", allow_pickle=False) as z:
        return z["mel"], float(z["duration"]), z["signature"], None


def _reusable(job: Job, existing: FeatureFile) -> tuple[dict[str, int], dict[str, tuple[str, np.ndarray]]]:
    """What an existing output still holds for ``job``: entries whose source has the recorded size and mtime.

    Returns name -> index in ``existing`` (features to copy) and name -> (reason, signature) (a file that
    was skipped and has not changed since). UNKNOWN signatures (format version 1) never match.
    """
    clips = {name: i for i, name in enumerate(existing.names)}
    skips = {name: (reason, sig) for (name, reason), sig in zip(existing.skipped, existing.skipped_sources,
                                                                 strict=True) if sig[0] != UNKNOWN}
    reuse_clip, reuse_skip = {}, {}
    for name, path in zip(job.names, job.paths, strict=True):
        if name not in clips and name not in skips:
            continue
        try:
            now = _signature(path)
        except OSError:
            continue
        if name in clips and np.array_equal(existing.sources[clips[name]], now):
            reuse_clip[name] = clips[name]
        elif name in skips and np.array_equal(skips[name][1], now):
            reuse_skip[name] = skips[name]
    return reuse_clip, reuse_skip


def _speed_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ClipsPerSecond(ProgressColumn):
        def render(self, task) -> Text:  # clips computed in this run per second of its wall time
            done = task.completed - task.fields.get("resumed", 0)
            rate = done / task.elapsed if task.elapsed and done else None
            return Text(f"{rate:.1f} clips/s" if rate else "- clips/s", style="cyan")

    return ClipsPerSecond()


class _LazyPool:
    """A process pool started on first use and shared by the jobs of one run (workers start slowly)."""

    def __init__(self, workers: int):
        self.workers, self.pool = workers, None

    def get(self):
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        if self.pool is None:
            # forkserver: a clean server process imports torch once, workers fork from it (fast start;
            # forking this process instead could hang the child if torch already started OpenMP threads).
            ctx = get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "torchaudio", "clotho_retrieve.features"])
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker)
        return self.pool

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


def run_job(job: Job, front_end: FrontEnd, workers: int = 0, strict: bool = False,
            pool: _LazyPool | None = None) -> dict:
    """Compute, finish or bring up to date one HDF5 file.

    Over an existing output with the same front end, clips whose source has the recorded name, size and
    mtime are copied from it, new or changed files are computed, removed ones dropped; when nothing
    changed, nothing is written. Returns {"out", "clips", "skipped", "computed", "reused", "removed",
    "status"}.
    """
    import shutil
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from clotho_retrieve.utils import err_console

    work = _work_dir(job.out, front_end)
    existing, reuse_clip, reuse_skip, removed = None, {}, {}, 0
    if job.out.is_file():
        try:
            existing = FeatureFile(job.out)
        except ClothoRetrieveError:
            existing = None
        if existing is None or existing.front_end != front_end:
            raise ClothoRetrieveError(
                f"{job.out}: exists with a different front end or format; delete it or choose another --out"
            )
        reuse_clip, reuse_skip = _reusable(job, existing)
        removed = len(set(existing.names) - set(job.names))
        if len(reuse_clip) + len(reuse_skip) == len(job.names):  # every source unchanged: same content?
            names = [n for n in job.names if n in reuse_clip]
            captions = [c for n, c in zip(job.names, job.captions, strict=True) if n in reuse_clip]
            skipped = job.skipped + [(n, reuse_skip[n][0]) for n in job.names if n in reuse_skip]
            if (existing.names, existing.captions, existing.skipped) == (names, captions, skipped) and all(
                str(existing.attrs.get(k)) == str(v) for k, v in job.attrs.items()
            ):
                shutil.rmtree(work, ignore_errors=True)  # killed after the rename
                return {"out": job.out, "clips": len(existing), "skipped": existing.skipped, "computed": 0,
                        "reused": len(job.names), "removed": 0, "status": "up to date"}
    if strict and (job.skipped or reuse_skip):
        name, reason = job.skipped[0] if job.skipped else next((n, r) for n, (r, _) in reuse_skip.items())
        raise ClothoRetrieveError(f"{name}: {reason} (--strict)")
    work.mkdir(parents=True, exist_ok=True)
    for stale in list(work.glob("*.part")) + list(job.out.parent.glob(f".{job.out.name}.*.h5.tmp")):
        stale.unlink(missing_ok=True)  # left by a run killed mid-write

    todo = [(name, path) for name, path in zip(job.names, job.paths, strict=True)
            if name not in reuse_clip and name not in reuse_skip and not _finished(name, path, work)[0]]
    workers = max(1, workers or os.cpu_count() or 1)
    progress = Progress(
        TextColumn(f"features {job.out.name}"), BarColumn(), MofNCompleteColumn(), _speed_column(),
        TimeRemainingColumn(), console=err_console, transient=False,
    )

    def record(name: str, reason: str | None) -> None:
        if reason is not None and strict:
            raise ClothoRetrieveError(f"{name}: {reason} (--strict)")
        progress.advance(task)

    with progress:
        resumed = len(job.names) - len(todo)  # reused from the old file or from shards of a killed run
        task = progress.add_task("", total=len(job.names), completed=resumed, resumed=resumed)
        if workers == 1 or len(todo) == 1:
            import torch

            threads = torch.get_num_threads()
            _init_worker()
            try:
                for name, path in todo:
                    record(*_compute_shard(name, path, work, front_end))
            finally:
                torch.set_num_threads(threads)
        elif todo:
            own_pool = pool is None
            pool = pool or _LazyPool(workers)
            pending = set()
            try:
                for name, path in todo:  # keep a bounded number of clips in flight
                    pending.add(pool.get().submit(_compute_shard, name, path, work, front_end))
                    if len(pending) >= 4 * workers:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            record(*fut.result())
                for fut in wait(pending).done:
                    record(*fut.result())
            except BrokenProcessPool:
                raise ClothoRetrieveError(
                    f"{job.out}: a worker process died (out of memory?); re-run to resume, "
                    "perhaps with fewer --workers"
                ) from None
            except BaseException:
                pool.close(cancel=True)
                raise
            if own_pool:
                pool.close()

    # Assemble in the job's order (what a run from scratch writes): reused clips are copied from the old
    # file, the others read from their shards. Written under a temporary name, then renamed.
    kept = []  # (name, captions, n_frames, duration, signature, index in the old file or None)
    skipped, skipped_sources = list(job.skipped), [np.full(2, UNKNOWN, np.int64)] * len(job.skipped)
    for name, caps in zip(job.names, job.captions, strict=True):
        if name in reuse_clip:
            i = reuse_clip[name]
            kept.append((name, caps, int(existing.n_frames[i]), float(existing.durations[i]),
                         existing.sources[i], i))
            continue
        if name in reuse_skip:
            reason, signature = reuse_skip[name]
        else:
            mel, duration, signature, reason = _shard(work, name)
        if reason is not None:
            skipped.append((name, reason))
            skipped_sources.append(signature)
        else:
            kept.append((name, caps, len(mel), duration, signature, None))

    def mels() -> Iterator[np.ndarray]:  # one clip in memory at a time
        for name, *_, i in kept:
            yield existing[i] if i is not None else _shard(work, name)[0]

    try:
        write_feature_file(job.out, [k[0] for k in kept], mels(), [k[3] for k in kept], front_end,
                           captions=[k[1] for k in kept], skipped=skipped, n_frames=[k[2] for k in kept],
                           sources=np.array([k[4] for k in kept], np.int64).reshape(-1, 2),
                           skipped_sources=np.array(skipped_sources, np.int64).reshape(-1, 2), **job.attrs)
    finally:
        if existing is not None:
            existing.close()
    shutil.rmtree(work, ignore_errors=True)
    reused = len(reuse_clip) + len(reuse_skip)
    status = "written" if existing is None else (
        f"updated: {reused} reused, {len(todo)} computed, {removed} removed"
    )
    return {"out": job.out, "clips": len(kept), "skipped": skipped, "computed": len(todo), "reused": reused,
            "removed": removed, "status": status}


def compute_features(
    cfg: FeaturesConfig,
    root: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    audio_dir: str | os.PathLike | None = None,
    splits: list[str] | None = None,
) -> list[dict]:
    """The `features` stage: a Clotho root (one HDF5 per split into folder ``out``) or ``audio_dir``
    (one HDF5 file ``out``). Resumable: re-running finishes an interrupted run, and brings a finished file
    up to date with its sources (see run_job).
    """
    import json

    from clotho_retrieve.utils import atomic_write_text

    if (root is None) == (audio_dir is None):
        raise ClothoRetrieveError("features: pass either --root (Clotho layout) or --audio-dir")
    if out is None:
        raise ClothoRetrieveError("features: --out is required")
    front_end = cfg.front_end()
    if root is not None:
        if Path(out).suffix == ".h5" or Path(out).is_file():
            raise ClothoRetrieveError(f"{out}: with --root, --out is a folder (one .h5 per split)")
        jobs = clotho_jobs(root, out, splits)
        config_path = Path(out) / "features_config.json"
    else:
        if Path(out).is_dir():
            raise ClothoRetrieveError(f"{out}: with --audio-dir, --out is a file (sounds.h5), not a folder")
        jobs = [audio_dir_job(audio_dir, out)]
        config_path = Path(out).with_suffix(".json")
    workers = cfg.workers or os.cpu_count() or 1
    pool = _LazyPool(workers)
    try:
        results = [run_job(job, front_end, workers, cfg.strict, pool) for job in jobs]
    finally:
        pool.close()
    record = {"features": dataclasses.asdict(cfg), "front_end": front_end.to_dict()}
    atomic_write_text(config_path, json.dumps(record, indent=2) + "\n")
    return results


def print_report(results: list[dict]) -> None:
    """A table of the files written (or already complete) and one of every clip skipped, with why."""
    from rich.table import Table

    from clotho_retrieve.utils import console

    table = Table(title="features")
    for col in ("file", "clips", "skipped", "computed now", "status"):
        table.add_column(col, justify="left" if col in ("file", "status") else "right")
    for r in results:
        table.add_row(str(r["out"]), str(r["clips"]), str(len(r["skipped"])), str(r["computed"]), r["status"])
    console.print(table)
    if all(r["status"] == "up to date" for r in results):
        console.print("Nothing to do: every output is complete and no source file changed.")
    skipped = [(r["out"].name, name, reason) for r in results for name, reason in r["skipped"]]
    if skipped:
        table = Table(title=f"skipped clips ({len(skipped)}, also stored in each file's /skipped)")
        for col in ("output", "file", "reason"):
            table.add_column(col, overflow="fold")
        for row in skipped:
            table.add_row(*row)
        console.print(table)
