"""The text tower in ONNX: a caption -> unit-norm embedding with onnxruntime + tokenizers, no torch.

A text query needs only the text tower: BERT's [CLS] vector of the last hidden state, the linear
projector to the joint space and L2 normalisation (the paper's text embedding, e_t = W_t h_[CLS] / ||.||).
:func:`export_text_tower` traces it once from a :class:`~clotho_retrieve.models.RetrievalModel` into
ONNX; :class:`OnnxTextEncoder` runs it with onnxruntime and tokenises with the ``tokenizers`` library,
so a query process imports neither torch (~2.4 s) nor transformers (~3 s) and any architecture that
transformers can trace works the same way.

On disk, a TOWER folder (for an index: ``INDEX/text_tower/``, see :func:`tower_dir`)::

    TOWER/text_tower.onnx        the graph: input_ids, attention_mask [, token_type_ids] (B, L) int64
                                 -> embedding (B, D) float32, unit norm; B and L are dynamic
    TOWER/text_tower.onnx.data   its weights (ONNX external data: onnxruntime maps the file instead of
                                 parsing it out of the protobuf, which halves the load time)
    TOWER/tokenizer.json         the run's fast tokenizer (no truncation or padding stored)
    TOWER/text_tower.json        what the encoder needs besides: D, the token limit, padding settings,
                                 the SHA-256 of the run's model.safetensors (to refuse a stale tower)

The folder is written under a temporary name and renamed into place, so a reader sees the old tower,
the new one, or none (then the query falls back to torch), never half of one.

This module imports neither torch nor transformers at import time (the exporter imports them lazily).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from clotho_retrieve.utils import ClothoRetrieveError, atomic_dir, recover_dir

TOWER_DIR = "text_tower"  # inside an INDEX folder
GRAPH_FILE = "text_tower.onnx"
DATA_FILE = "text_tower.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "text_tower.json"
FORMAT_VERSION = 1
OPSET = 17  # LayerNormalization is one ONNX op from opset 17 on
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EXPORT_TOLERANCE = 1e-4  # max |ONNX - torch| over the export's own check captions
EXPORT_HINT = "export the text tower once (`clotho-retrieve export --index INDEX`) for a query without torch"

# Captions the export is checked on: a padded batch, a caption alone (no padding: a graph that baked in
# "mask present" or "mask absent" would differ), and one cut at the token limit.
CHECK_CAPTIONS = (
    "a dog barks",
    "rain falls on a tin roof while a car passes by in the distance and a door slams",
    "Café au lait — 犬の鳴き声 🐕",
)


def tower_dir(index_dir: str | os.PathLike) -> Path:
    """Where an index keeps the ONNX text tower of the run that built it."""
    return Path(index_dir) / TOWER_DIR


# ----------------------------------------------------------------------------------------------
# Export (torch + transformers, imported lazily)
# ----------------------------------------------------------------------------------------------
def _graph_module(text):
    """The traced function: token ids (B, L) -> unit-norm text embeddings (B, D)."""
    import torch.nn.functional as F
    from torch import nn

    class TextTowerGraph(nn.Module):
        def __init__(self, text, names: tuple[str, ...]):
            super().__init__()
            self.bert, self.projector, self.names = text.bert, text.projector, names

        def forward(self, *inputs):
            h = self.bert(**dict(zip(self.names, inputs, strict=True))).last_hidden_state  # (B, L, D_S)
            return F.normalize(self.projector(h[:, 0]), dim=-1)  # [CLS] -> (B, D), unit norm

    tokenizer = text.tokenizer
    names = tuple(n for n in INPUTS if n in tokenizer.model_input_names)
    if names[:2] != INPUTS[:2]:
        raise ClothoRetrieveError(
            f"text model {type(text.bert).__name__}: its tokenizer gives {tokenizer.model_input_names}; "
            "the ONNX export needs input_ids and attention_mask"
        )
    # eval(): the exporter puts the module it is given back into that module's mode afterwards, children
    # included, so a module left in training mode would switch the tower's dropout back on
    return TextTowerGraph(text, names).eval(), names


def _tokenizer_settings(tokenizer) -> dict:
    """The fast tokenizer's padding and truncation settings, as transformers applies them per call."""
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ClothoRetrieveError(
            f"text tokenizer {type(tokenizer).__name__} has no fast (tokenizers) version; the ONNX text "
            "tower needs one. Queries keep using torch"
        )
    if tokenizer.pad_token_id is None:
        raise ClothoRetrieveError(f"text tokenizer {type(tokenizer).__name__} has no padding token")
    return {
        "pad_id": int(tokenizer.pad_token_id),
        "pad_token": str(tokenizer.pad_token),
        "pad_type_id": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        "padding_side": str(tokenizer.padding_side),
        "truncation_side": str(tokenizer.truncation_side),
    }


@contextlib.contextmanager
def _new_folder(folder: Path) -> Iterator[Path]:
    """A temporary folder that replaces ``folder`` on success (utils.atomic_dir), refusing a second
    writer of the same folder while the first holds its lock (which also makes atomic_dir's fixed
    temporary name safe, and lets a writer clean up after one killed mid-swap)."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClothoRetrieveError(f"{folder}: another process is writing it; wait for it") from None
        recover_dir(folder)
        with atomic_dir(folder) as tmp:
            yield tmp


def _trace(graph, names: tuple[str, ...], example: dict, path: Path) -> None:
    """torch.onnx's TorchScript exporter (no onnxscript needed) -> one .onnx file, B and L dynamic."""
    import warnings

    import torch

    dynamic = {n: {0: "batch", 1: "sequence"} for n in names} | {"embedding": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation of the TorchScript exporter, tracer notes
        torch.onnx.export(
            graph,
            tuple(example[n] for n in names),
            str(path),
            input_names=list(names),
            output_names=["embedding"],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _optimize(raw: Path, path: Path) -> None:
    """Save onnxruntime's optimised graph (fused MatMul + bias, LayerNorm, GELU) with its weights in
    DATA_FILE, so a query loads it without optimising again and maps the weights instead of parsing them
    (bert-base, loaded 2-core machine: 2.1 s to load the plain export, 0.07 s this one; MiniLM: 0.45 s,
    0.07 s; benchmarks/query_startup.py times whole queries).

    "Extended" optimisations only: their fused operators run on any CPU (the "all" level adds layouts
    specific to this machine's instruction set)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.log_severity_level = 3
    ort.InferenceSession(str(raw), options, providers=["CPUExecutionProvider"])


def export_text_tower(model, folder: str | os.PathLike, weights_sha256: str | None = None) -> Path:
    """Export ``model``'s text tower (a RetrievalModel's ``.text``) to ONNX in ``folder`` (replaced).

    ``weights_sha256``: the SHA-256 of the run's model.safetensors the tower comes from (recorded, so
    a query can tell a stale tower from the index's run). The export is checked against torch on
    :data:`CHECK_CAPTIONS` and refused beyond :data:`EXPORT_TOLERANCE`. Returns the folder.
    """
    import torch

    from clotho_retrieve.encoder import torch_threads

    text = getattr(model, "text", None)
    if text is None or not hasattr(text, "bert") or not hasattr(text, "tokenizer"):
        raise ClothoRetrieveError("this model has no transformers text tower to export")
    folder = Path(folder)
    settings = _tokenizer_settings(text.tokenizer)
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in text.parameters()):
        text = copy.deepcopy(text).float().cpu()  # trace and check in float32 on the CPU, where queries run
    graph, names = _graph_module(text)
    was_training = text.training
    text.eval()
    try:
        # One torch thread: the exporter's passes over the weights run many small ops, and on a busy CPU
        # each multi-threaded one waits for a descheduled worker (MiniLM, loaded 2-core machine: 30 s -> 12 s)
        with torch_threads(1), _new_folder(folder) as tmp:
            example = text.tokenize(list(CHECK_CAPTIONS[:2]), "cpu")  # padded: the mask is traced as data
            try:
                _trace(graph, names, dict(example), tmp / "traced.onnx")
                _optimize(tmp / "traced.onnx", tmp / GRAPH_FILE)
            except Exception as exc:  # torch.onnx and onnxruntime raise many kinds; the first line says why
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ClothoRetrieveError(
                    f"{folder}: cannot export the text model {type(text.bert).__name__} to ONNX ({first})"
                ) from None
            (tmp / "traced.onnx").unlink()
            backend = text.tokenizer.backend_tokenizer
            backend = type(backend).from_str(backend.to_str())  # a copy: the caller's stays as it was
            backend.no_truncation()
            backend.no_padding()
            backend.save(str(tmp / TOKENIZER_FILE))
            meta = {
                "format_version": FORMAT_VERSION,
                "embed_dim": int(model.cfg.embed_dim),
                "max_text_tokens": int(text.max_tokens),
                "inputs": list(names),
                "weights_sha256": weights_sha256,
                "text_model": str(model.cfg.text_model),
                "model_type": str(getattr(text.bert.config, "model_type", "")),
                **settings,
                "opset": OPSET,
                "torch": torch.__version__,
                "onnxruntime": _ort_version(),
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            _check_export(text, tmp, meta["max_text_tokens"])
    finally:
        text.train(was_training)
    return folder


def _check_export(text, folder: Path, max_tokens: int) -> None:
    """Compare the exported tower with torch on the check captions (and one cut at the token limit)."""
    import torch
    import torch.nn.functional as F

    captions = [*CHECK_CAPTIONS, "birds singing " * max_tokens]
    onnx_tower = OnnxTextEncoder(folder)
    with torch.no_grad():
        want = F.normalize(text(captions), dim=-1).float().cpu().numpy()  # (B, D)
        alone = F.normalize(text(captions[:1]), dim=-1).float().cpu().numpy()
    got, got_alone = onnx_tower.encode_text(captions), onnx_tower.encode_text(captions[:1])
    diff = max(float(np.abs(got - want).max()), float(np.abs(got_alone - alone).max()))
    if not diff <= EXPORT_TOLERANCE:
        raise ClothoRetrieveError(
            f"{folder}: the exported text tower differs from torch by {diff:.2g} (> {EXPORT_TOLERANCE}); "
            f"this text model ({type(text.bert).__name__}) does not trace to ONNX faithfully"
        )


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def export_model_dir(
    model_dir: str | os.PathLike, folder: str | os.PathLike, weights_sha256: str | None = None
) -> Path:
    """Export the text tower of a saved model folder (config.json + model.safetensors + text/)."""
    from clotho_retrieve.models import RetrievalModel

    model = RetrievalModel.from_pretrained(model_dir, parts=("text",))
    return export_text_tower(model, folder, weights_sha256)


# ----------------------------------------------------------------------------------------------
# Inference (onnxruntime + tokenizers)
# ----------------------------------------------------------------------------------------------
def read_meta(folder: str | os.PathLike) -> dict | None:
    """The tower's text_tower.json when the folder holds a complete tower of a known format, else None."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    complete = all((folder / f).is_file() for f in (GRAPH_FILE, DATA_FILE, TOKENIZER_FILE))
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or not complete:
        return None
    return meta


def find_text_tower(index_dir: str | os.PathLike, weights_sha256: str) -> Path | None:
    """An index's ONNX text tower if it was exported from the weights the index was built with, else None
    (none yet, incomplete, of another format, or from other weights: the caller falls back to torch)."""
    folder = tower_dir(index_dir)
    meta = read_meta(folder)
    return folder if meta is not None and meta.get("weights_sha256") == weights_sha256 else None


class OnnxTextEncoder:
    """The text half of :class:`~clotho_retrieve.encoder.Encoder`, from an exported TOWER folder.

    ``threads``: onnxruntime intra-op threads. 1 (default) suits single queries: a few tokens, and on a
    busy CPU a second thread is mostly waited for; None lets onnxruntime use every core (batches).
    ``prepack``: let onnxruntime repack the weights for its matrix kernels when loading. Runs get about
    twice as fast but loading bert-base takes ~2 s longer: worth it for a server or many captions, not
    for one query.
    """

    front_end = None  # text only: no audio input

    def __init__(
        self, folder: str | os.PathLike, threads: int | None = 1, batch_size: int = 64, prepack: bool = False
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(folder)
        meta = read_meta(folder)
        if meta is None:
            raise ClothoRetrieveError(
                f"{folder}: not a complete ONNX text tower (format {FORMAT_VERSION}); export it again"
            )
        self.name = str(folder)
        self.meta = meta
        self.embed_dim = int(meta["embed_dim"])
        self.max_text_tokens = int(meta["max_text_tokens"])
        self.weights_sha256 = meta.get("weights_sha256")
        self.batch_size = batch_size
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default (all cores)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done at export
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        try:
            self.session = ort.InferenceSession(
                str(folder / GRAPH_FILE), options, providers=["CPUExecutionProvider"]
            )
            self._tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        except Exception as exc:  # onnxruntime and tokenizers raise their own plain exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ClothoRetrieveError(
                f"{folder}: unreadable ONNX text tower ({first}); export it again"
            ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        # One tokenizer (loading bert's tokenizer.json costs ~0.05 s): n_tokens switches its truncation
        # off for a moment, under a lock, as threads of a server may be tokenizing at the same time.
        self._lock = threading.Lock()
        self._truncate()
        self._tokenizer.enable_padding(
            direction=meta["padding_side"],
            pad_id=int(meta["pad_id"]),
            pad_type_id=int(meta["pad_type_id"]),
            pad_token=meta["pad_token"],
        )

    def _truncate(self) -> None:
        self._tokenizer.enable_truncation(self.max_text_tokens, direction=self.meta["truncation_side"])

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Texts -> the graph's inputs (B, L) int64: truncated to max_text_tokens, padded to the longest,
        as ``tokenizer(texts, padding=True, truncation=True, max_length=max_text_tokens)`` in transformers."""
        with self._lock:
            encodings = self._tokenizer.encode_batch(list(texts))
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return {n: np.asarray(columns[n], dtype=np.int64) for n in self.input_names}

    def n_tokens(self, text: str) -> int:
        """Tokens of ``text`` before truncation, special tokens included."""
        with self._lock:
            self._tokenizer.no_truncation()
            try:
                return len(self._tokenizer.encode(text).ids)
            finally:
                self._truncate()

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (B, D) float32 unit-norm embeddings, in batches of ``batch_size``."""
        texts = list(texts)
        out = np.empty((len(texts), self.embed_dim), np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenize(texts[start : start + self.batch_size])
            out[start : start + self.batch_size] = self.session.run(["embedding"], batch)[0]
        return out

    def encode_audio(self, inputs) -> np.ndarray:
        raise ClothoRetrieveError(f"{self.name}: an ONNX text tower encodes text only")

    def audio_inputs_from_file(self, path: str | os.PathLike) -> np.ndarray:
        raise ClothoRetrieveError(f"{self.name}: an ONNX text tower encodes text only")


# ----------------------------------------------------------------------------------------------
# An index's tower: what embed, export, query and serve call
# ----------------------------------------------------------------------------------------------
def ensure_text_tower(
    index_dir: str | os.PathLike, model_dir: str | os.PathLike, weights_sha256: str, model=None
) -> Path | None:
    """Export the run's text tower beside an index unless a current one is there, and its int8 version
    for `serve` (clotho_retrieve/text_int8.py); returns the float32 tower's folder.

    ``model``: the run's RetrievalModel when the caller has it with its text tower (spares loading it
    again). A text model that cannot be exported is reported in one line and None returned: queries of
    that index go through torch. A tower that cannot be quantized is reported in one line (`serve` then
    uses the float32 one).
    """
    from rich.markup import escape

    from clotho_retrieve.utils import err_console

    found = find_text_tower(index_dir, weights_sha256)
    try:
        if found is None:
            with err_console.status("exporting the text tower to ONNX"):
                if model is not None and getattr(model, "text", None) is not None:
                    found = export_text_tower(model, tower_dir(index_dir), weights_sha256)
                else:
                    found = export_model_dir(model_dir, tower_dir(index_dir), weights_sha256)
    except ClothoRetrieveError as exc:
        err_console.print(
            f"[yellow]warning:[/] no ONNX text tower, text queries will use torch: {escape(str(exc))}",
            soft_wrap=True,
        )
        return None
    from clotho_retrieve.text_int8 import ensure_int8_tower

    try:
        with err_console.status("quantizing the text tower to int8"):
            ensure_int8_tower(found)
    except ClothoRetrieveError as exc:
        err_console.print(f"[yellow]warning:[/] no int8 text tower: {escape(str(exc))}", soft_wrap=True)
    return found


def open_text_tower(index_dir: str | os.PathLike, weights_sha256: str, **options) -> OnnxTextEncoder | None:
    """The index's ONNX text tower as an encoder (``options`` as OnnxTextEncoder's), or None after a
    one-line note saying how to export one (then the caller encodes through torch)."""
    from clotho_retrieve.utils import err_console

    folder = find_text_tower(index_dir, weights_sha256)
    try:
        if folder is not None:
            return OnnxTextEncoder(folder, **options)
        why = "has no ONNX text tower of the run that built it"
    except ClothoRetrieveError as exc:
        why = f"has an unusable ONNX text tower ({exc})"
    from rich.markup import escape

    hint = EXPORT_HINT.replace("INDEX", str(index_dir))
    err_console.print(f"[dim]note:[/] {escape(f'{index_dir} {why}; {hint}')}", soft_wrap=True)  # one line
    return None
