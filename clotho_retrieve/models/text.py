"""Text tower: a BERT-family encoder from transformers, its [CLS] vector, and a linear projector to D."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from clotho_retrieve.utils import ClothoRetrieveError


def _encoder_layers(bert: nn.Module) -> list[nn.Module]:
    """The transformer layers, bottom to top, of BERT/RoBERTa/ELECTRA (encoder.layer) or DistilBERT."""
    for path in ("encoder.layer", "transformer.layer", "encoder.layers"):
        obj = bert
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    raise ClothoRetrieveError(f"{type(bert).__name__}: cannot find its transformer layers to freeze")


class TextEncoder(nn.Module):
    """Captions -> [CLS] of the last hidden state (B, D_S) -> linear projector -> (B, D).

    ``source`` is a hub name or a local folder holding a transformers config and tokenizer. With
    ``load_weights=False`` the body is built from the config alone (random weights, no weight download);
    :meth:`RetrievalModel.from_pretrained` then fills it from our own safetensors.

    ``trainable_layers``: -1 fine-tunes everything; 0 freezes the whole body (embeddings and all layers);
    k > 0 freezes the embeddings and all but the top k layers. The pooler is always frozen: the [CLS]
    vector of the last hidden state is used, not the pooler output, so it gets no gradient anyway
    (and unused trainable parameters upset DistributedDataParallel).
    """

    def __init__(
        self,
        source: str | os.PathLike,
        embed_dim: int,
        max_tokens: int = 64,
        trainable_layers: int = -1,
        load_weights: bool = True,
    ):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        source = str(source)
        hf_logging.set_verbosity_error()  # "some weights were not used" etc. would drown our own messages
        hf_logging.disable_progress_bar()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            if load_weights:
                self.bert = AutoModel.from_pretrained(source)
            else:
                self.bert = AutoModel.from_config(AutoConfig.from_pretrained(source))
        except OSError as exc:
            where = "folder" if Path(source).exists() else "model name"
            first = str(exc).strip().splitlines()[0]
            raise ClothoRetrieveError(
                f"{source}: cannot load the text model ({where}): {first}. Offline, pass a local folder "
                f"(e.g. one written by `clotho-retrieve download --text-model`)"
            ) from None
        self.max_tokens = max_tokens
        self.d_s = self.bert.config.hidden_size  # D_S
        self.projector = nn.Linear(self.d_s, embed_dim)
        self._freeze(trainable_layers)

    def _freeze(self, trainable_layers: int) -> None:
        pooler = getattr(self.bert, "pooler", None)
        if pooler is not None:
            pooler.requires_grad_(False)
        if trainable_layers < 0:
            return
        layers = _encoder_layers(self.bert)
        frozen = layers[: max(len(layers) - trainable_layers, 0)]
        for module in [self.bert.embeddings, *frozen]:
            module.requires_grad_(False)

    def tokenize(self, texts: list[str], device: torch.device | str) -> dict[str, Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return {k: v.to(device) for k, v in batch.items()}

    def n_tokens(self, text: str) -> int:
        """Tokens of ``text`` before truncation, special tokens included."""
        return len(self.tokenizer(text, truncation=False)["input_ids"])

    def cls(self, texts: list[str]) -> Tensor:
        """Captions -> the [CLS] vector of the last hidden state, (B, D_S)."""
        batch = self.tokenize(texts, self.projector.weight.device)
        return self.bert(**batch).last_hidden_state[:, 0]

    def forward(self, texts: list[str]) -> Tensor:
        return self.projector(self.cls(texts))  # (B, D), not yet normalised

    def save_text_files(self, folder: str | os.PathLike) -> None:
        """HF config + tokenizer, so the tower can be rebuilt offline with AutoModel.from_config."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.bert.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
