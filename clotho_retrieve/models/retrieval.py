"""The retrieval model: audio tower (backbone -> attention -> mean pooling -> projector) x text tower.

Both towers end in a linear projector to the joint space of width D and return unit-norm embeddings,
so the similarity of an audio clip and a caption is their dot product (cosine similarity).

On disk (``save_pretrained``)::

    MODEL/config.json          ModelConfig as JSON
    MODEL/model.safetensors    every weight, keys "audio.*" and "text.*"
    MODEL/text/                the text model's HF config.json + tokenizer files (no weights)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clotho_retrieve.config import ModelConfig
from clotho_retrieve.encoder import PARTS, WEIGHTS_FILE, resolve_model_dir
from clotho_retrieve.models.attention import build_attention, masked_mean
from clotho_retrieve.models.backbones import build_backbone, load_panns_checkpoint
from clotho_retrieve.models.text import TextEncoder
from clotho_retrieve.utils import ClothoRetrieveError, atomic_dir

__all__ = ["PARTS", "AudioEncoder", "ModelConfig", "RetrievalModel"]


class AudioEncoder(nn.Module):
    """log-Mel (B, T, M) -> backbone frames (B, T', C) -> D_A -> attention -> mean over valid frames -> D."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = build_backbone(cfg.backbone, cfg.n_mels, cfg.dropout)
        C = self.backbone.out_channels
        # CNN14 gives C = 2048 channels while the paper's attention works at D_A = 1024: a linear map
        # C -> D_A per frame, skipped when C == D_A.
        self.to_d_a = nn.Identity() if C == cfg.d_a else nn.Linear(C, cfg.d_a)
        self.attention = build_attention(cfg.attention, cfg.d_a, cfg.dropout)
        self.projector = nn.Linear(cfg.d_a, cfg.embed_dim)

    def frames(self, logmel: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> attended frames F (B, T', D_A), valid-frame mask (B, T'), weights (B, T', T') | None."""
        F_, out_lengths = self.backbone(logmel, lengths)  # (B, T', C)
        mask = torch.arange(F_.shape[1], device=F_.device)[None, :] < out_lengths[:, None]  # (B, T')
        F_ = self.to_d_a(F_)  # (B, T', D_A)
        F_, A = self.attention(F_, mask)
        return F_, mask, A

    def forward(self, logmel: Tensor, lengths: Tensor) -> Tensor:
        F_, mask, _ = self.frames(logmel, lengths)
        return self.projector(masked_mean(F_, mask))  # (B, D), not yet normalised


class RetrievalModel(nn.Module):
    """The paper's model. ``parts`` selects the towers to build (("text",) for text-only queries)."""

    def __init__(
        self,
        cfg: ModelConfig,
        load_text_weights: bool = True,
        *,
        parts: tuple[str, ...] = PARTS,
        text_source: str | os.PathLike | None = None,
    ):
        super().__init__()
        bad = set(parts) - set(PARTS)
        if bad or not parts:
            raise ClothoRetrieveError(f"model parts must be a non-empty subset of {PARTS}, got {parts}")
        self.cfg = cfg
        self.parts = tuple(p for p in PARTS if p in parts)
        self.audio = AudioEncoder(cfg) if "audio" in parts else None
        self.text = None
        if "text" in parts:
            self.text = TextEncoder(
                text_source or cfg.text_model,
                cfg.embed_dim,
                cfg.max_text_tokens,
                cfg.text_trainable_layers,
                load_weights=load_text_weights,
            )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _need(self, part: str) -> nn.Module:
        tower = getattr(self, part)
        if tower is None:
            raise ClothoRetrieveError(f"this model was loaded without its {part} tower (parts={self.parts})")
        return tower

    def _check_logmel(self, logmel: Tensor, lengths: Tensor) -> None:
        if logmel.ndim != 3 or logmel.shape[-1] != self.cfg.n_mels:
            raise ClothoRetrieveError(
                f"log-Mel input has shape {tuple(logmel.shape)}; the model expects (B, T, {self.cfg.n_mels})"
            )
        if lengths.shape != (logmel.shape[0],):
            raise ClothoRetrieveError(
                f"lengths has shape {tuple(lengths.shape)}, expected ({logmel.shape[0]},)"
            )

    def encode_audio(self, logmel: Tensor, lengths: Tensor) -> Tensor:
        """(B, T, M), (B,) valid frames -> (B, D) unit-norm audio embeddings."""
        audio = self._need("audio")
        self._check_logmel(logmel, lengths)
        return F.normalize(audio(logmel, lengths), dim=-1)

    def encode_text(self, texts: list[str]) -> Tensor:
        """B captions -> (B, D) unit-norm text embeddings."""
        return F.normalize(self._need("text")(texts), dim=-1)

    def forward(self, logmel: Tensor, lengths: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode_audio(logmel, lengths), self.encode_text(texts)

    def attention_map(self, logmel: Tensor, lengths: Tensor) -> Tensor | None:
        """Softmax attention weights (B, T', T') over backbone frames (rows i attend to columns j);
        None for ``attention="none"``. Rows and columns beyond a clip's T' are padding."""
        audio = self._need("audio")
        self._check_logmel(logmel, lengths)
        return audio.frames(logmel, lengths)[2]

    def load_audio_weights(self, path: str | os.PathLike) -> dict:
        """Load an official PANNs AudioSet checkpoint into the backbone (see load_panns_checkpoint)."""
        return load_panns_checkpoint(self._need("audio").backbone, path)

    # ------------------------------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, atomic: bool = True) -> None:
        """Write config.json, model.safetensors and text/ into ``folder``, replacing it atomically
        (``atomic=False``: straight into ``folder``, which the caller swaps in itself)."""
        from safetensors.torch import save_file

        if atomic:
            with atomic_dir(folder) as tmp:
                self.save_pretrained(tmp, atomic=False)
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2), encoding="utf-8")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"parts": ",".join(self.parts)})
        if self.text is not None:
            self.text.save_text_files(folder / "text")

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        parts: tuple[str, ...] = PARTS,
        device: str | torch.device = "cpu",
        which: str = "best",
    ) -> RetrievalModel:
        """Rebuild a saved model offline: no hub access, the text tower from text/ + our weights.

        ``parts=("text",)`` builds and loads only the text tower (what the ONNX export of
        clotho_retrieve/text_onnx.py traces; a text query itself runs that export, without torch).
        """
        from safetensors import SafetensorError, safe_open

        folder = resolve_model_dir(path, which)
        config_path, weights_path = folder / "config.json", folder / WEIGHTS_FILE
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ClothoRetrieveError(f"{config_path}: unreadable model config ({exc})") from None
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            raw = raw["model"]
        if not isinstance(raw, dict):
            raise ClothoRetrieveError(f"{config_path}: expected a JSON object of model settings")
        try:
            cfg = ModelConfig.from_dict(raw)
        except TypeError as exc:
            raise ClothoRetrieveError(f"{config_path}: bad model settings ({exc})") from None
        text_dir = folder / "text"
        if "text" in parts and not (text_dir / "config.json").is_file():
            raise ClothoRetrieveError(f"{text_dir}: missing the text model's config.json and tokenizer")

        model = cls(cfg, load_text_weights=False, parts=tuple(parts), text_source=text_dir)
        expected = model.state_dict()
        try:
            with safe_open(str(weights_path), framework="pt", device="cpu") as f:
                keys = [k for k in f.keys() if k.split(".", 1)[0] in model.parts]
                state = {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ClothoRetrieveError(
                f"{weights_path}: corrupt or unreadable safetensors file ({exc})"
            ) from None
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            example = (missing or unexpected)[0]
            raise ClothoRetrieveError(
                f"{weights_path}: does not match {folder / 'config.json'} "
                f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {example})"
            )
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise ClothoRetrieveError(
                    f"{weights_path}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
                )
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()
