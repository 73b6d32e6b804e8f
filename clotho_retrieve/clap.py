"""Pretrained LAION-CLAP models (transformers' ``ClapModel``) behind the project's one Encoder interface.

A model given to ``embed``, ``query``, ``evaluate`` or ``serve`` is either a run folder of ours or a CLAP
model; :func:`is_clap_model` tells them apart with one rule:

* an existing local folder is a CLAP model when its ``config.json`` says ``"model_type": "clap"``
  (anything else on disk, a run folder included, is not);
* a name that is not on disk is a CLAP model when it has the form of a hub id, ``OWNER/NAME``, and either
  NAME contains "clap" (any case: ``laion/clap-htsat-unfused``, ``laion/larger_clap_general``, ...) or the
  local hub cache already holds its ``config.json`` with model type "clap" (a prefetched fine-tune).

Audio input (``ClapFrontEnd``): exactly what the checkpoint's ``ClapFeatureExtractor`` computes for one
clip, given alone: the file is decoded (audio.open_audio: WAV, FLAC, OGG, MP3), mixed down to mono (mean
of the channels), resampled to the extractor's rate (48 kHz) with audio.resample (soxr HQ), then the
extractor gives the (C, T, F) log-Mel input (C = 1 for truncation "rand_trunc", 4 for "fusion";
T = 1001 frames of 10 s; F = 64 bands).

* Repeatable crops: the extractor crops clips longer than 10 s at random (``np.random``). Every clip is
  computed with NumPy's global generator seeded with ``CROP_SEED`` (0) and restored afterwards, so the
  input is exactly ``np.random.seed(0); feature_extractor(clip, sampling_rate=48000)``: the same file
  always gives the same crop, whatever was computed before it and in any process.
* ``is_longer``: in fusion mode the extractor marks a clip alone as "longer" whether or not it is (when no
  clip of a batch is longer it marks one at random, as LAION-CLAP's own HTSAT does), so the fused model
  always takes the fusion branch for a clip embedded alone. :class:`ClapEncoder` passes ``is_longer`` True
  for every clip, which keeps each embedding independent of the clips batched with it. Unfused models
  ignore ``is_longer``.
* What can be cached: the (C, T, F) input flattened to (C * T, F) float32 rows, the layout of the HDF5
  features file (one row a frame): 256 KB a clip unfused, 1 MB fused, whatever the clip's length.
  ``ClapFrontEnd.file_features`` computes those rows (the features stage's per-file function);
  :meth:`ClapEncoder.encode_audio` takes either shape.

Text: the checkpoint's RoBERTa tokenizer, cut at ``max_text_tokens`` (the tokenizer's limit, at most the
model's positions), padded per batch; embeddings are ``get_text_features`` / ``get_audio_features``
(projection, then L2 normalisation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clotho_retrieve.audio import open_audio, resample  # resample: soxr HQ, as every front end
from clotho_retrieve.encoder import PARTS, autocast, torch_threads
from clotho_retrieve.utils import ClothoRetrieveError

CLAP_PRESET = "clap"
CROP_SEED = 0
RESAMPLER = "soxr-hq"  # audio.resample
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SEED_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------
# What is a CLAP model
# ----------------------------------------------------------------------------------------------
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _model_type(config_json: str | os.PathLike | None) -> str | None:
    if config_json is None or not Path(config_json).is_file():
        return None
    try:
        return json.loads(Path(config_json).read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_clap_model(spec: str | os.PathLike) -> bool:
    """True for a local folder whose config.json has model_type "clap", or an OWNER/NAME hub id that is
    not on disk and names a CLAP model (NAME contains "clap", or the hub cache holds a CLAP config)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.is_dir() and _model_type(path / "config.json") == "clap"
    name = str(spec)
    if not HUB_ID.fullmatch(name):
        return False
    if "clap" in name.split("/", 1)[1].lower():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid id or an unreadable cache: not something we know to be CLAP
        return False
    return isinstance(cached, str) and _model_type(cached) == "clap"


def is_clap_front_end(front_end) -> bool:
    """Whether a front end (a dict, HDF5 attributes or a front-end object) describes CLAP inputs."""
    if isinstance(front_end, ClapFrontEnd):
        return True
    preset = front_end.get("preset") if isinstance(front_end, dict) else None
    return (preset.decode() if isinstance(preset, bytes) else preset) == CLAP_PRESET


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------
def decode_mono(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Any format the features stage reads -> (mono float32 waveform, sample rate), via audio.open_audio:
    channels averaged, every broken file a ClothoRetrieveError with the reason only (callers add the file)."""
    with open_audio(path) as audio:
        return audio.read_all(), int(audio.sample_rate)


@contextlib.contextmanager
def _seeded_numpy(seed: int):
    """NumPy's global generator seeded for the block, its previous state restored after (thread-safe)."""
    with _SEED_LOCK:
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


# ----------------------------------------------------------------------------------------------
# The CLAP front end
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClapFrontEnd:
    """Every parameter of a ClapFeatureExtractor's input, plus how we decode, resample and crop.

    ``to_dict()`` is flat (HDF5 attributes, JSON); ``preset`` "clap" tells it from a log-Mel FrontEnd.
    Fields keep FrontEnd's names where they mean the same (sample_rate, n_mels, n_fft, hop_length, ...).
    """

    preset: str = CLAP_PRESET
    sample_rate: int = 48000  # the extractor's sampling_rate
    n_mels: int = 64  # feature_size
    n_fft: int = 1024  # fft_window_size (periodic Hann)
    hop_length: int = 480
    f_min: float = 0.0  # frequency_min
    f_max: float = 14000.0  # frequency_max
    top_db: float | None = None
    max_length_s: int = 10
    truncation: str = "fusion"  # "fusion" (4 channels) | "rand_trunc" (1)
    padding: str = "repeatpad"  # "repeatpad" | "repeat" | "pad"
    padding_value: float = 0.0
    crop_seed: int = CROP_SEED
    resampler: str = RESAMPLER

    def __post_init__(self) -> None:
        if self.preset != CLAP_PRESET:
            raise ClothoRetrieveError(f"CLAP front end: preset must be {CLAP_PRESET!r}, not {self.preset!r}")
        if self.truncation not in ("fusion", "rand_trunc"):
            raise ClothoRetrieveError(f"CLAP front end: unknown truncation {self.truncation!r}")
        if self.resampler != RESAMPLER:
            raise ClothoRetrieveError(f"CLAP front end: unknown resampler {self.resampler!r}")

    @classmethod
    def of_extractor(cls, fe, crop_seed: int = CROP_SEED) -> ClapFrontEnd:
        """The front end of a transformers ClapFeatureExtractor."""
        return cls(
            sample_rate=int(fe.sampling_rate), n_mels=int(fe.feature_size), n_fft=int(fe.fft_window_size),
            hop_length=int(fe.hop_length), f_min=float(fe.frequency_min), f_max=float(fe.frequency_max),
            top_db=None if fe.top_db is None else float(fe.top_db), max_length_s=int(fe.max_length_s),
            truncation=str(fe.truncation), padding=str(fe.padding), padding_value=float(fe.padding_value),
            crop_seed=crop_seed,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ClapFrontEnd:
        """From a dict (JSON or HDF5 attributes): bytes and NumPy scalars are converted, "none" is None,
        keys that are not fields are ignored."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            value = value.decode() if isinstance(value, bytes) else value
            value = value.item() if isinstance(value, np.generic) else value
            if f.name == "top_db":
                value = None if value in ("none", "", None) else float(value)
            elif f.type == "int":
                value = int(value)
            elif f.type == "float":
                value = float(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    def differences(self, other) -> list[str]:
        """``field: mine != other`` lines; empty when both compute the same inputs."""
        a = self.to_dict()
        b = other.to_dict() if hasattr(other, "to_dict") else dict(other)
        return [f"{k}: {a[k]!r} != {b.get(k)!r}" for k in a if a[k] != b.get(k)]

    @property
    def channels(self) -> int:
        """C: 4 Mel images for fusion (the whole clip shrunk, then 3 crops), 1 for rand_trunc."""
        return 4 if self.truncation == "fusion" else 1

    @property
    def frames(self) -> int:
        """T: frames of one 10-s window (centred STFT: 1 + samples // hop)."""
        return self.max_length_s * self.sample_rate // self.hop_length + 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.frames, self.n_mels)

    def extractor(self):
        """A transformers ClapFeatureExtractor with exactly these parameters (cached)."""
        return _extractor(self)

    def inputs(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono waveform at any rate -> (C, T, F) float32: the extractor's input_features for this clip."""
        waveform = np.asarray(waveform, dtype=np.float32)
        if waveform.ndim != 1 or len(waveform) == 0:
            raise ClothoRetrieveError(f"CLAP input: expected a non-empty mono waveform, got {waveform.shape}")
        if not np.all(np.isfinite(waveform)):
            raise ClothoRetrieveError("audio contains NaN or infinite samples")
        x = resample(waveform, sample_rate, self.sample_rate)
        with _seeded_numpy(self.crop_seed):
            out = self.extractor()(x, sampling_rate=self.sample_rate, return_tensors="np")
        mel = np.ascontiguousarray(out["input_features"][0], dtype=np.float32)  # (C, T, F)
        if mel.shape != self.shape or (self.truncation == "fusion" and not bool(out["is_longer"][0][0])):
            raise RuntimeError(  # the extractor changed behaviour: ClapEncoder's is_longer would be wrong
                f"ClapFeatureExtractor gave {mel.shape}, is_longer {out['is_longer']}; expected {self.shape}"
            )
        return mel

    def file_inputs(self, path: str | os.PathLike) -> tuple[np.ndarray, float]:
        """Decode any audio file -> ((C, T, F) input, duration in s); errors carry the reason only."""
        wave, sr = decode_mono(path)
        return self.inputs(wave, sr), len(wave) / sr

    def file_features(self, path: str | os.PathLike) -> tuple[np.ndarray, float]:
        """``file_inputs`` as (C * T, F) rows: what the HDF5 features file stores for a clip."""
        mel, duration = self.file_inputs(path)
        return mel.reshape(-1, self.n_mels), duration


@functools.lru_cache(maxsize=8)
def _extractor(front_end: ClapFrontEnd):
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(
        feature_size=front_end.n_mels, sampling_rate=front_end.sample_rate, hop_length=front_end.hop_length,
        max_length_s=front_end.max_length_s, fft_window_size=front_end.n_fft,
        padding_value=front_end.padding_value, frequency_min=front_end.f_min, frequency_max=front_end.f_max,
        top_db=front_end.top_db, truncation=front_end.truncation, padding=front_end.padding,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def clap_source(spec: str | os.PathLike) -> str:
    """What to load and to record: a local folder's absolute path, else the hub id as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else str(spec)


def _local_only(spec: str | os.PathLike) -> bool:
    """Load from local files only: offline (HF_HUB_OFFLINE), or a hub id whose config and weights the hub
    cache already holds (`download --model` or an earlier load fetched them). An index keeps working with
    the checkpoint that built it, without asking the hub, even if the hub's copy has changed since."""
    if _offline():
        return True
    if Path(spec).expanduser().exists():
        return False  # a local folder: nothing to fetch
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(str(spec), "config.json")
    except Exception:  # an invalid id or an unreadable cache
        return False
    return isinstance(config, str) and clap_weights_file(spec) is not None


@contextlib.contextmanager
def _load_errors(spec: str | os.PathLike):
    """Turn transformers / hub loading failures into one ClothoRetrieveError line."""
    try:
        yield
    except ClothoRetrieveError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        detail = " ".join(str(exc).split())[:300]
        hint = ""
        if not Path(spec).expanduser().exists():
            hint = f"; prefetch it with `clotho-retrieve download --model {spec}`, or check the name"
        raise ClothoRetrieveError(f"{spec}: cannot load this CLAP model ({detail}){hint}") from None


def clap_weights_file(spec: str | os.PathLike) -> Path | None:
    """The checkpoint's weights file on this machine (a local folder's, or the hub cache's for a hub id;
    model.safetensors before pytorch_model.bin), e.g. to fingerprint the model; None when not found."""
    path = Path(spec).expanduser()
    for name in WEIGHT_FILES:
        if path.is_dir():
            if (path / name).is_file():
                return (path / name).resolve()
            continue
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(spec), name)
        except Exception:  # an invalid id or an unreadable cache
            cached = None
        if isinstance(cached, str):
            return Path(cached)
    return None


def clap_config(spec: str | os.PathLike):
    """The checkpoint's ClapConfig; refuses a folder or hub id whose model type is not "clap"."""
    from transformers import ClapConfig, PretrainedConfig

    with _load_errors(spec):
        config, _ = PretrainedConfig.get_config_dict(clap_source(spec), local_files_only=_local_only(spec))
        if config.get("model_type") != "clap":
            raise ClothoRetrieveError(f"{spec}: not a CLAP model (model_type {config.get('model_type')!r})")
        return ClapConfig.from_dict(config)


def clap_front_end(spec: str | os.PathLike) -> ClapFrontEnd:
    """The audio input a CLAP checkpoint expects, from its preprocessor config only (no weights loaded)."""
    from transformers import ClapFeatureExtractor

    config = clap_config(spec)
    with _load_errors(spec):
        fe = ClapFeatureExtractor.from_pretrained(clap_source(spec), local_files_only=_local_only(spec))
    front_end = ClapFrontEnd.of_extractor(fe)
    fused = bool(config.audio_config.enable_fusion)
    if fused != (front_end.truncation == "fusion"):
        raise ClothoRetrieveError(
            f"{spec}: the audio model {'fuses 4' if fused else 'takes 1'} Mel channel(s) but its feature "
            f"extractor's truncation is {front_end.truncation!r}; the checkpoint is inconsistent"
        )
    return front_end


class ClapEncoder:
    """The Encoder of a transformers CLAP model (both towers, or only the one ``parts`` asks for)."""

    def __init__(self, model, tokenizer, front_end: ClapFrontEnd, name: str, embed_dim: int,
                 max_text_tokens: int, batch_size: int = 8, text_batch_size: int = 64, amp: bool = False,
                 threads: int | None = None):  # fmt: skip
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.clap_front_end = front_end
        self.front_end = front_end.to_dict()
        self.name = name
        self.embed_dim = int(embed_dim)
        self.max_text_tokens = int(max_text_tokens)
        self.batch_size = batch_size
        self.text_batch_size = text_batch_size
        self.amp = amp
        self.threads = threads
        self.weights: Path | None = clap_weights_file(name)  # what produced the embeddings (fingerprints)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _has(self, tower: str) -> bool:
        return hasattr(self.model, f"{tower}_model")

    def _run(self, fn, n: int, batch_size: int) -> np.ndarray:
        import torch

        out = np.empty((n, self.embed_dim), np.float32)
        with torch_threads(self.threads), torch.inference_mode(), autocast(self.device, self.amp):
            for start in range(0, n, batch_size):
                out[start : start + batch_size] = fn(start, start + batch_size).float().cpu().numpy()
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)  # unit norm in float32
        return out

    def _audio_batch(self, inputs: Sequence[np.ndarray]):
        import torch

        C, T, F = self.clap_front_end.shape
        batch = torch.empty(len(inputs), C, T, F, dtype=torch.float32)  # (B, C, T, F)
        for i, x in enumerate(inputs):
            x = np.asarray(x, dtype=np.float32)
            if x.shape not in ((C, T, F), (C * T, F)):
                raise ClothoRetrieveError(
                    f"{self.name}: audio input of shape {x.shape}, expected {(C, T, F)} or {(C * T, F)}; "
                    "compute the features with this model's front end"
                )
            batch[i] = torch.from_numpy(x.reshape(C, T, F))
        return batch.to(self.device)

    def encode_audio(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """(C, T, F) or (C * T, F) CLAP inputs -> (B, D) unit-norm audio embeddings, in the order given."""
        import torch
        import torch.nn.functional as Fn

        if not self._has("audio"):
            raise ClothoRetrieveError(f"{self.name}: loaded without its audio tower")

        def batch(a: int, b: int):
            x = self._audio_batch(inputs[a:b])  # (B, C, T, F)
            is_longer = torch.ones(len(x), 1, dtype=torch.bool, device=x.device)  # see the module docstring
            if hasattr(self.model, "get_audio_features"):
                return self.model.get_audio_features(input_features=x, is_longer=is_longer).pooler_output
            return Fn.normalize(self.model(input_features=x, is_longer=is_longer).audio_embeds, dim=-1)

        return self._run(batch, len(inputs), self.batch_size)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (B, D) unit-norm text embeddings (RoBERTa -> projection -> L2 norm)."""
        import torch.nn.functional as Fn

        if not self._has("text"):
            raise ClothoRetrieveError(f"{self.name}: loaded without its text tower")
        texts = [str(t) for t in texts]

        def batch(a: int, b: int):
            cut = {"truncation": True, "max_length": self.max_text_tokens}
            tokens = self.tokenizer(texts[a:b], padding=True, return_tensors="pt", **cut).to(self.device)
            if hasattr(self.model, "get_text_features"):
                return self.model.get_text_features(**tokens).pooler_output
            return Fn.normalize(self.model(**tokens).text_embeds, dim=-1)

        return self._run(batch, len(texts), self.text_batch_size)

    def n_tokens(self, text: str) -> int:
        """Tokens of ``text`` before truncation, special tokens included."""
        return len(self.tokenizer(text, truncation=False)["input_ids"])

    def audio_inputs_from_file(self, path: str | os.PathLike) -> np.ndarray:
        """Decode any audio file -> this model's (C, T, F) input; errors name the file."""
        try:
            return self.clap_front_end.file_inputs(path)[0]
        except ClothoRetrieveError as exc:
            raise ClothoRetrieveError(f"{path}: {exc}") from None


def load_clap(
    spec: str | os.PathLike,
    device: str = "cpu",
    parts: tuple[str, ...] = PARTS,
    batch_size: int = 8,
    text_batch_size: int = 64,
    amp: bool = False,
    threads: int | None = None,
) -> ClapEncoder:
    """Load a CLAP model (local folder or hub id; only local files when HF_HUB_OFFLINE is set or the hub
    cache holds the checkpoint).

    Both parts: ClapModel; one part: only that tower (ClapAudio/TextModelWithProjection), same weights.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        ClapAudioModelWithProjection,
        ClapModel,
        ClapTextModelWithProjection,
    )

    from clotho_retrieve.utils import resolve_device

    parts = tuple(parts)
    if not parts or set(parts) - set(PARTS):
        raise ClothoRetrieveError(f"parts {parts}: choose from {PARTS}")
    config = clap_config(spec)
    front_end = clap_front_end(spec)
    cls = ClapModel if set(parts) == set(PARTS) else {
        "audio": ClapAudioModelWithProjection, "text": ClapTextModelWithProjection
    }[parts[0]]  # fmt: skip
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # one tower of a ClapModel checkpoint: its report of the unused weights
    bar = hf_logging.is_progress_bar_enabled()
    kwargs = {"local_files_only": _local_only(spec), "dtype": torch.float32}
    with _load_errors(spec):
        tokenizer = AutoTokenizer.from_pretrained(clap_source(spec), local_files_only=_local_only(spec))
        hf_logging.disable_progress_bar()  # "Loading weights" (hub downloads keep their own bars)
        try:
            model = cls.from_pretrained(clap_source(spec), **kwargs).to(resolve_device(device))
        finally:
            if bar:
                hf_logging.enable_progress_bar()
    max_tokens = min(int(tokenizer.model_max_length), int(config.text_config.max_position_embeddings) - 2)
    return ClapEncoder(model, tokenizer, front_end, name=str(spec), embed_dim=config.projection_dim,
                       max_text_tokens=max_tokens, batch_size=batch_size, text_batch_size=text_batch_size,
                       amp=amp, threads=threads)  # fmt: skip
