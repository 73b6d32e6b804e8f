"""Reading audio: decoding (soundfile), mono mix-down, truncation checks, block reading, resampling.

``open_audio(path)`` opens a file with libsndfile (WAV, FLAC, OGG, MP3) and turns every way a file can be
broken into a ClothoRetrieveError with the reason only (the caller adds the file name): empty, truncated
(a WAV whose data chunk runs past the end of the file, or fewer frames than the header declares),
undecodable, NaN or infinite samples. Inside it, ``AudioFile.blocks(n)`` yields mono float32 blocks (the
mean of the channels), so a long file is read in bounded memory. 16-bit PCM (Clotho's WAVs) is read as
int16 and scaled by 2**-15 here: the floats libsndfile would give, at a fraction of the cost.

Resampling is python-soxr (libsoxr, quality "HQ": the band-limited resampler ``librosa.load`` uses by
default). ``resample`` converts a whole signal; ``StreamResampler`` converts one given in consecutive
blocks and gives the same samples as ``resample`` of the whole signal, bit for bit (libsoxr buffers its
input and filters fixed-size blocks of its own, whatever the sizes of the blocks it is given).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from clotho_retrieve.utils import ClothoRetrieveError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
RESAMPLE_QUALITY = "HQ"  # libsoxr's 20-bit recipe: pass band to 91 % of Nyquist, > 120 dB stop band


def audio_files(folder: Path) -> list[Path]:
    """Every file with an audio suffix under ``folder`` (recursively, any case), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


# ----------------------------------------------------------------------------------------------
# Resampling
# ----------------------------------------------------------------------------------------------
def resample(waveform: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Mono float32 ``waveform`` at ``orig`` Hz -> float32 at ``new`` Hz (unchanged when the rates match).

    Output length: len(waveform) * new / orig, rounded (libsoxr's count); no delay (libsoxr removes it).
    """
    if orig == new:
        return waveform
    import soxr

    x = np.ascontiguousarray(waveform, dtype=np.float32)
    return soxr.resample(x, orig, new, quality=RESAMPLE_QUALITY)


class StreamResampler:
    """``resample`` over a signal given in consecutive blocks: push() each block, then finish() once.

    The outputs, concatenated, equal ``resample`` of the whole signal (see the module docstring).
    """

    def __init__(self, orig: int, new: int):
        self.stream = None
        if orig != new:
            import soxr

            self.stream = soxr.ResampleStream(orig, new, 1, dtype="float32", quality=RESAMPLE_QUALITY)

    def push(self, block: np.ndarray) -> np.ndarray:
        """The resampled samples that ``block`` completes (libsoxr holds back a filter's length)."""
        block = np.ascontiguousarray(block, dtype=np.float32)
        if self.stream is None:
            return block
        return self.stream.resample_chunk(block, last=False)

    def finish(self) -> np.ndarray:
        """The samples still held back, through the end of the signal."""
        if self.stream is None:
            return np.zeros(0, np.float32)
        return self.stream.resample_chunk(np.zeros(0, np.float32), last=True)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------
def _truncated_wav(info: str) -> str | None:
    """libsndfile logs 'data : N (should be M)' for a WAV whose data chunk runs past the file's end."""
    m = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", info, re.M)
    if m and int(m.group(1)) > int(m.group(2)):
        return f"truncated: data chunk declares {m.group(1)} bytes, the file holds {m.group(2)}"
    return None


INT16_SCALE = np.float32(1.0 / 32768.0)  # libsndfile's int16 -> float normalisation (exact in float32)


class AudioFile:
    """An open audio file read as mono float32 blocks; ``n_read`` counts the frames decoded so far."""

    def __init__(self, sf_file):
        self._file = sf_file
        self.sample_rate: int = sf_file.samplerate
        self.frames: int = sf_file.frames  # as declared by the header
        self.n_read = 0
        # 16-bit PCM is read as int16 and scaled here: the same floats as libsndfile's float read
        # (x / 32768 is exact), about 8x faster, and integers need no NaN check.
        self._int16 = sf_file.subtype == "PCM_16"

    def _read(self, block: int) -> np.ndarray:
        """Up to ``block`` frames as float32 (frames, channels)."""
        if not self._int16:
            return self._file.read(block, dtype="float32", always_2d=True)
        return np.multiply(self._file.read(block, dtype="int16", always_2d=True), INT16_SCALE,
                           dtype=np.float32)

    def blocks(self, block: int) -> Iterator[np.ndarray]:
        """Mono (mean of the channels) float32 blocks of ``block`` frames (the last one shorter)."""
        while True:
            data = self._read(block)
            if len(data) == 0:
                return
            mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
            if not self._int16 and not np.all(np.isfinite(mono)):
                raise ClothoRetrieveError("audio contains NaN or infinite samples")
            self.n_read += len(mono)
            yield mono

    def check_complete(self) -> None:
        """Raise when fewer frames decoded than the header declares (call after the last block)."""
        if self.n_read < self.frames:
            raise ClothoRetrieveError(
                f"truncated: header declares {self.frames} frames, only {self.n_read} decode"
            )

    def read_all(self, margin: int = 0) -> np.ndarray:
        """The whole (rest of the) file as one mono float32 signal; raises when it is truncated.

        With ``margin``, the signal starts at index ``margin`` of an array ``2 margin`` samples longer
        (the margins left unset): room to pad it in place, without copying the signal again.
        """
        dtype = "int16" if self._int16 else "float32"
        raw = self._file.read(max(self.frames - self.n_read, 1), dtype=dtype, always_2d=True)  # (frames, ch)
        while len(more := self._file.read(1 << 16, dtype=dtype, always_2d=True)):  # a header that undercounts
            raw = np.concatenate([raw, more])
        out = np.empty(len(raw) + 2 * margin, np.float32)
        body = out[margin : margin + len(raw)]
        if raw.shape[1] == 1 and self._int16:
            np.multiply(raw[:, 0], INT16_SCALE, out=body)
        elif raw.shape[1] == 1:
            body[:] = raw[:, 0]
        else:  # the mean of float32 channels, as blocks() mixes them
            body[:] = (np.multiply(raw, INT16_SCALE, dtype=np.float32) if self._int16 else raw).mean(axis=1)
        if not self._int16 and not np.all(np.isfinite(body)):
            raise ClothoRetrieveError("audio contains NaN or infinite samples")
        self.n_read += len(raw)
        self.check_complete()
        return out

    @property
    def duration(self) -> float:
        """Seconds decoded so far."""
        return self.n_read / self.sample_rate


@contextlib.contextmanager
def open_audio(path: str | os.PathLike) -> Iterator[AudioFile]:
    """Open ``path`` for reading; any failure inside the block becomes a one-line ClothoRetrieveError.

    Refuses a file without samples and a WAV whose data chunk is cut short before yielding. Decoder and
    numeric errors raised within the ``with`` block (soundfile's, or a RuntimeError / ValueError / OSError
    of the caller's processing) become "unreadable audio (...)"; ClothoRetrieveErrors pass unchanged.
    """
    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as f:
            if reason := _truncated_wav(f.extra_info):
                raise ClothoRetrieveError(reason)
            if f.frames <= 0:
                raise ClothoRetrieveError("no audio samples (empty or truncated file)")
            yield AudioFile(f)
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
