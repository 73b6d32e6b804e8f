"""A minimal BERT encoder in plain torch, for fast text-only inference (`clotho-retrieve query`).

Importing transformers' BERT modelling code costs ~3 s on a small CPU (it pulls in torch._dynamo,
torchaudio and scipy), more than the whole query budget. For BERT-architecture text models
(``model_type == "bert"``: bert-base-uncased, all-MiniLM-L6-v2) this module computes the same
last hidden state from the same weights: its parameters carry transformers' ``BertModel`` names
(``embeddings.word_embeddings.weight``, ``encoder.layer.0.attention.self.query.weight``, ...), so the
``text.bert.*`` tensors that :meth:`RetrievalModel.save_pretrained` writes load unchanged. Captions are
tokenised by the ``tokenizers`` library from the saved ``text/tokenizer.json``, with the truncation and
padding of :meth:`TextEncoder.tokenize`.

Inference only: no dropout, and no pooler (the [CLS] vector of the last hidden state is used, as in
:class:`~clotho_retrieve.models.text.TextEncoder`). Anything this encoder cannot reproduce exactly
(another architecture, relative position embeddings, a decoder, an unknown activation, no
tokenizer.json) makes :meth:`BertTextEncoder.from_folder` return None, and the caller falls back to
transformers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# config.json "hidden_act" -> the function transformers applies ("gelu" is the exact erf form)
ACTIVATIONS = {
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


class Linear(nn.Linear):
    """nn.Linear without random initialisation: every weight here is loaded from a checkpoint, and
    initialising bert-base's 110 M parameters first would cost ~1 s of the query's start-up."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without random initialisation (see Linear)."""

    def reset_parameters(self) -> None:
        pass


@dataclass(frozen=True)
class BertConfig:
    """The fields of a transformers BERT config.json this encoder needs."""

    vocab_size: int
    hidden_size: int  # D_S
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_hf(cls, d: dict) -> BertConfig | None:
        """A transformers config dict -> BertConfig, or None when this encoder cannot reproduce the model."""
        if (
            d.get("model_type") != "bert"
            or d.get("position_embedding_type", "absolute") != "absolute"
            or d.get("is_decoder")
            or d.get("add_cross_attention")
            or d.get("hidden_act") not in ACTIVATIONS
        ):
            return None
        try:
            cfg = cls(**{f.name: d[f.name] for f in fields(cls)})
        except (KeyError, TypeError):
            return None
        return cfg if cfg.hidden_size % cfg.num_attention_heads == 0 else None


class BertEmbeddings(nn.Module):
    """Token ids -> word + absolute position + token type embeddings -> LayerNorm, (B, L, D_S)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.LayerNorm(x + self.token_type_embeddings(token_type_ids))  # (B, L, D_S)


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention: softmax(Q K^T / sqrt(d_k) + mask) V (Vaswani et al. Eq. 1)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.query = Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        B, L, H = x.shape
        d_k = H // self.n_head

        def heads(t: Tensor) -> Tensor:  # (B, L, H) -> (B, n_head, L, d_k)
            return t.view(B, L, self.n_head, d_k).transpose(1, 2)

        Q, K, V = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = Q @ K.transpose(-2, -1) / math.sqrt(d_k) + mask_bias  # (B, n_head, L, L)
        context = scores.softmax(dim=-1) @ V  # (B, n_head, L, d_k)
        return context.transpose(1, 2).reshape(B, L, H)


class BertAddNorm(nn.Module):
    """LayerNorm(x + dense(h)): BERT's "output" block after attention and after the intermediate layer."""

    def __init__(self, d_in: int, cfg: BertConfig):
        super().__init__()
        self.dense = Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(x + self.dense(h))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertAddNorm(cfg.hidden_size, cfg)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))  # (B, L, intermediate_size)


class BertLayer(nn.Module):
    """One transformer layer: attention + residual + LayerNorm, feed-forward + residual + LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertAddNorm(cfg.intermediate_size, cfg)

    def forward(self, x: Tensor, mask_bias: Tensor) -> Tensor:
        x = self.attention(x, mask_bias)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertModel(nn.Module):
    """Token ids + attention mask -> last hidden state (B, L, D_S), as transformers' BertModel."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        x = self.embeddings(input_ids, token_type_ids)  # (B, L, D_S)
        # padding keys get the most negative float, as in transformers: exp() makes their weight 0
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, mask_bias)  # mask_bias (B, 1, 1, L) broadcasts over heads and queries
        return x


class CaptionTokenizer:
    """Captions -> input_ids, token_type_ids, attention_mask (B, L) int64, from a tokenizer.json.

    Right-truncation to ``max_tokens`` (special tokens included) and padding to the longest caption,
    as ``tokenizer(texts, padding=True, truncation=True, max_length=max_tokens)`` in transformers.
    """

    def __init__(
        self,
        tokenizer_json: str,
        pad_token: str,
        max_tokens: int,
        truncation_side: str = "right",
        padding_side: str = "right",
    ):
        from tokenizers import Tokenizer

        self.max_tokens = max_tokens
        self._counter = Tokenizer.from_str(tokenizer_json)  # no truncation: counts a query's tokens
        self._counter.no_truncation()
        self._counter.no_padding()
        self._tokenizer = Tokenizer.from_str(tokenizer_json)
        pad_id = self._tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
        self._tokenizer.enable_truncation(max_length=max_tokens, direction=truncation_side)
        self._tokenizer.enable_padding(direction=padding_side, pad_id=pad_id, pad_token=pad_token)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, max_tokens: int) -> CaptionTokenizer | None:
        """The tokenizer saved in a transformers folder, or None without tokenizer.json."""
        folder = Path(folder)
        try:
            tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
            settings = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            return cls(
                tokenizer_json,
                settings.get("pad_token") or "[PAD]",
                max_tokens,
                settings.get("truncation_side", "right"),
                settings.get("padding_side", "right"),
            )
        except Exception:  # missing or unreadable files; tokenizers reports a bad file as a plain Exception
            return None

    def __call__(self, texts: list[str]) -> dict[str, Tensor]:
        encodings = self._tokenizer.encode_batch(list(texts))
        return {
            "input_ids": torch.tensor([e.ids for e in encodings]),
            "token_type_ids": torch.tensor([e.type_ids for e in encodings]),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings]),
        }  # each (B, L)

    def n_tokens(self, text: str) -> int:
        """Tokens of ``text`` before truncation, special tokens included."""
        return len(self._counter.encode(text).ids)


class BertTextEncoder(nn.Module):
    """Inference twin of TextEncoder for BERT models: captions -> [CLS] (B, D_S) -> projector -> (B, D).

    Its state-dict keys are TextEncoder's (``bert.*``, ``projector.*``) minus the unused pooler, so a saved
    RetrievalModel's ``text.*`` weights load into it; its output equals TextEncoder's in eval mode.
    """

    unused_prefixes = ("bert.pooler.",)  # saved by transformers' BertModel, never read for [CLS]

    def __init__(self, cfg: BertConfig, tokenizer: CaptionTokenizer, embed_dim: int, max_tokens: int):
        super().__init__()
        self.bert = BertModel(cfg)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.d_s = cfg.hidden_size  # D_S
        self.projector = Linear(self.d_s, embed_dim)

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike, embed_dim: int, max_tokens: int
    ) -> BertTextEncoder | None:
        """Build from a folder with a transformers config.json and tokenizer.json, or None when the model is
        not a BERT this encoder reproduces exactly (then use TextEncoder). The weights are left
        uninitialised: load a TextEncoder's state dict into it (RetrievalModel.from_pretrained does)."""
        try:
            hf_config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        cfg = BertConfig.from_hf(hf_config) if isinstance(hf_config, dict) else None
        if cfg is None or max_tokens > cfg.max_position_embeddings:
            return None
        tokenizer = CaptionTokenizer.from_folder(folder, max_tokens)
        return None if tokenizer is None else cls(cfg, tokenizer, embed_dim, max_tokens)

    def n_tokens(self, text: str) -> int:
        return self.tokenizer.n_tokens(text)

    def cls(self, texts: list[str]) -> Tensor:
        """Captions -> the [CLS] vector of the last hidden state, (B, D_S)."""
        device = self.projector.weight.device
        batch = {k: v.to(device) for k, v in self.tokenizer(texts).items()}
        return self.bert(**batch)[:, 0]

    def forward(self, texts: list[str]) -> Tensor:
        return self.projector(self.cls(texts))  # (B, D), not yet normalised
