"""One encoder interface: a model that maps audio and text into one joint space.

Every stage that encodes (train's validation, ``evaluate``, ``embed``, ``query``, ``explain``, and the
server) goes through :class:`Encoder` and nothing else::

    enc = load_model("runs/self-ntxent")          # a run folder, a model folder, best/ or last/
    enc = load_model("laion/clap-htsat-unfused")  # or a pretrained CLAP model (clap.py): hub id or folder
    A = enc.encode_audio([mel_1, mel_2, ...])     # (B, D) float32, unit norm (numpy)
    T = enc.encode_text(["a dog barks", ...])     # (B, D) float32, unit norm (numpy)
    S = T @ A.T                                   # cosine similarities

``encode_audio`` takes a list of per-clip inputs in whatever form that model wants them (the log-Mel
frames (T_i, M) of :attr:`Encoder.front_end` for our runs) and batches them itself: clips are sorted by
length so a batch pads little, moved to the encoder's device, run under autocast where ``amp`` is asked
for on CUDA, and returned in the order given.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from clotho_retrieve.utils import ClothoRetrieveError

WEIGHTS_FILE = "model.safetensors"
PARTS = ("audio", "text")


@runtime_checkable
class Encoder(Protocol):
    """What every model offers the pipeline (our trained runs; pretrained CLAP models plug in here)."""

    name: str  # what was loaded: a model folder or a hub id
    embed_dim: int  # D, the joint space's width
    front_end: dict | None  # the audio input encode_audio expects (FrontEnd.to_dict()), None: unknown
    max_text_tokens: int  # captions are cut to this many tokens

    def encode_audio(self, inputs: Sequence[np.ndarray]) -> np.ndarray: ...  # -> (B, D) unit norm

    def encode_text(self, texts: Sequence[str]) -> np.ndarray: ...  # -> (B, D) unit norm

    def n_tokens(self, text: str) -> int: ...  # tokens of one text before truncation

    def audio_inputs_from_file(self, path: str | os.PathLike) -> np.ndarray: ...  # one encode_audio input


# ----------------------------------------------------------------------------------------------
# Finding a model on disk
# ----------------------------------------------------------------------------------------------
def resolve_model_dir(path: str | os.PathLike, which: str = "best") -> Path:
    """A model folder (config.json + model.safetensors), given it or a run folder (then RUN/which/)."""
    if which not in ("best", "last"):
        raise ClothoRetrieveError(f"--which {which}: choose best or last")
    path = Path(path).expanduser()
    for candidate in (path, path / which):
        if (candidate / WEIGHTS_FILE).is_file() and (candidate / "config.json").is_file():
            return candidate.resolve()
    if not path.exists():
        raise ClothoRetrieveError(f"{path}: no such model or run folder")
    raise ClothoRetrieveError(
        f"{path}: neither a model folder (config.json + {WEIGHTS_FILE}) nor a run folder with one in "
        f"{which}/ (no {WEIGHTS_FILE}); pass a run folder written by `clotho-retrieve train` or a model "
        "folder"
    )


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class RunFingerprint:
    """Which weights produced embeddings: the SHA-256 of the weights file (plus its stat, a cache).

    The file is MODEL_DIR/model.safetensors for our runs; a CLAP checkpoint's is its model.safetensors or
    pytorch_model.bin (clap.clap_weights_file), in its folder or the hub cache's snapshot folder.
    """

    model_dir: str
    sha256: str
    size: int
    mtime_ns: int

    @classmethod
    def of(
        cls, model_dir: Path, known: RunFingerprint | None = None, weights: str = WEIGHTS_FILE
    ) -> RunFingerprint:
        """Hash MODEL_DIR/``weights``, unless ``known`` describes the same unchanged file (same folder,
        size and mtime)."""
        st = (Path(model_dir) / weights).stat()  # follows the hub cache's symlink to its blob
        stat = (str(model_dir), st.st_size, st.st_mtime_ns)
        if known is not None and (known.model_dir, known.size, known.mtime_ns) == stat:
            return known
        return cls(str(model_dir), file_sha256(Path(model_dir) / weights), st.st_size, st.st_mtime_ns)

    @classmethod
    def of_file(cls, weights: Path, known: RunFingerprint | None = None) -> RunFingerprint:
        """The fingerprint of one weights file (its folder is the recorded ``model_dir``)."""
        return cls.of(Path(weights).parent, known, Path(weights).name)


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------
def pad_batch(arrays: Sequence[np.ndarray]):
    """Stack (T_i, M) log-Mels into a zero-padded (B, T_max, M) tensor and their lengths (B,).

    Zero padding is harmless: the model masks frames beyond ``lengths`` in attention and pooling.
    """
    import torch

    lengths = torch.tensor([a.shape[0] for a in arrays], dtype=torch.long)  # (B,)
    n_mels = arrays[0].shape[1]
    logmel = torch.zeros(len(arrays), int(lengths.max()), n_mels, dtype=torch.float32)  # (B, T_max, M)
    for i, a in enumerate(arrays):
        logmel[i, : a.shape[0]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return logmel, lengths


def autocast(device, enabled: bool):
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op elsewhere."""
    import torch

    device = torch.device(device)
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run torch on ``n`` CPU threads inside the block (None: leave as is)."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Our trained runs
# ----------------------------------------------------------------------------------------------
class RunEncoder:
    """The Encoder of a :class:`~clotho_retrieve.models.RetrievalModel` (loaded, or being trained).

    ``threads``: torch CPU threads while encoding (1 suits a single short query on a busy CPU:
    MiniLM, one query, 2 threads on a loaded 2-core machine: 0.6 s; 1 thread: 0.02 s).
    """

    def __init__(
        self,
        model,
        name: str = "",
        batch_size: int = 32,
        text_batch_size: int = 256,
        amp: bool = False,
        threads: int | None = None,
    ):
        self.model = model
        self.name = name
        self.batch_size = batch_size
        self.text_batch_size = text_batch_size
        self.amp = amp
        self.threads = threads
        self.embed_dim = int(model.cfg.embed_dim)
        self.front_end = model.cfg.front_end
        self.max_text_tokens = int(model.cfg.max_text_tokens)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _run(self, fn, n: int, batch_size: int, order: np.ndarray) -> np.ndarray:
        import torch

        out = np.empty((n, self.embed_dim), np.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch_threads(self.threads), torch.inference_mode(), autocast(self.device, self.amp):
                for start in range(0, n, batch_size):
                    rows = order[start : start + batch_size]
                    out[rows] = fn(rows).float().cpu().numpy()
        finally:
            self.model.train(was_training)
        return out

    def encode_audio(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """(T_i, M) log-Mels -> (B, D) unit-norm embeddings; batches of similar length limit padding."""
        if not len(inputs):
            return np.empty((0, self.embed_dim), np.float32)
        device = self.device

        def batch(rows):
            logmel, lengths = pad_batch([inputs[int(r)] for r in rows])  # (B, T, M), (B,)
            return self.model.encode_audio(logmel.to(device), lengths.to(device))

        order = np.argsort([a.shape[0] for a in inputs], kind="stable")
        return self._run(batch, len(inputs), self.batch_size, order)

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (B, D) unit-norm embeddings (BERT [CLS] -> projector)."""
        texts = list(texts)
        return self._run(
            lambda rows: self.model.encode_text([texts[int(r)] for r in rows]),
            len(texts),
            self.text_batch_size,
            np.arange(len(texts)),
        )

    def n_tokens(self, text: str) -> int:
        return self.model.text.n_tokens(text)

    def audio_inputs_from_file(self, path: str | os.PathLike) -> np.ndarray:
        """Decode one audio file into this model's input: (T, M) log-Mel frames of its front end (the one
        it was trained on); errors name the file."""
        from clotho_retrieve.frontend import FrontEnd, file_log_mel

        if not self.front_end:
            raise ClothoRetrieveError(f"{self.name}: the model records no front end to compute inputs with")
        return file_log_mel(path, FrontEnd.from_dict(self.front_end))[0]

    def attention_map(self, mel: np.ndarray) -> np.ndarray | None:
        """One clip's softmax attention weights (T', T') over backbone frames; None for attention none."""
        import torch

        logmel, lengths = pad_batch([mel])
        with torch.inference_mode():
            A = self.model.attention_map(logmel.to(self.device), lengths.to(self.device))  # (1, T', T')
        return None if A is None else A[0].float().cpu().numpy()


def load_model(
    path: str | os.PathLike,
    which: str = "best",
    device: str = "cpu",
    parts: tuple[str, ...] = PARTS,
    batch_size: int = 32,
    amp: bool = False,
    threads: int | None = None,
) -> Encoder:
    """The one way to load a model for encoding: a run folder (its ``which`` model), a model folder, or a
    pretrained CLAP model (a hub id such as laion/clap-htsat-unfused, or its folder; ``which`` ignored).

    ``parts`` builds only the towers needed (("text",) for text queries without an ONNX text tower:
    no audio model; with one, clotho_retrieve/text_onnx.py encodes text without torch).
    """
    from clotho_retrieve.clap import is_clap_model, load_clap
    from clotho_retrieve.models import RetrievalModel
    from clotho_retrieve.utils import resolve_device

    if is_clap_model(path):
        return load_clap(path, device=device, parts=parts, batch_size=batch_size, amp=amp, threads=threads)

    folder = resolve_model_dir(path, which)
    model = RetrievalModel.from_pretrained(folder, parts=tuple(parts), device=resolve_device(device))
    return RunEncoder(model, name=str(folder), batch_size=batch_size, amp=amp, threads=threads)
