"""The ONNX text tower with int8 weights: what `serve` encodes queries with by default.

The text tower's cost is its matrix products (BERT's Q, K, V, attention output and the two feed-forward
layers of every block). :func:`quantize_text_tower` rewrites them with onnxruntime's dynamic
quantization: each weight matrix W (d_in, d_out) is stored as int8 with one scale per output column
(per channel, symmetric: W ~ s_j * q_ij, q in [-127, 127]); at run time each activation matrix is
quantized to uint8 with its own scale and zero point, multiplied in integers (VNNI instructions where
the CPU has them) and scaled back to float32. Everything else (embeddings, LayerNorm, softmax, the
attention products of two activations, the projector's normalisation) stays float32. MiniLM, 2-core
AVX512-VNNI machine, one query: 1.5 ms instead of 8.1 ms (float32 as `query` loads it) or 4.4 ms
(float32, weights prepacked); embeddings keep a cosine of ~0.993 on average (0.98 at worst over 2,000
captions) with float32 ones, and retrieval metrics move by under 0.01 (benchmarks/text_tower.py).

On disk, inside the float32 TOWER folder (so a new export of the tower drops a stale int8 one with it)::

    TOWER/int8/text_tower.onnx(.data)  the quantized graph (optimised as the float32 one is at export)
    TOWER/int8/tokenizer.json          a copy of the tower's
    TOWER/int8/text_tower.json         the tower's text_tower.json + precision "int8", how it was made, and
                                       the smallest cosine to float32 seen on the check captions

A quantized tower is checked against the float32 one on :data:`CHECK_TEXTS` when it is written and
again when a server opens it (the integer kernels differ between CPUs): below :data:`MIN_COSINE` it is
refused and the float32 tower is served, after a one-line warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from clotho_retrieve.text_onnx import (
    CHECK_CAPTIONS,
    GRAPH_FILE,
    META_FILE,
    TOKENIZER_FILE,
    OnnxTextEncoder,
    _new_folder,
    _optimize,
    find_text_tower,
    read_meta,
)
from clotho_retrieve.utils import ClothoRetrieveError

INT8_DIR = "int8"  # inside a TOWER folder
PRECISIONS = ("int8", "fp32")  # serve --text-precision
MIN_COSINE = 0.98  # smallest cosine(int8, float32) accepted on CHECK_TEXTS (MiniLM: ~0.991)
QUANTIZATION = {
    "method": "dynamic", "ops": ["MatMul"], "weights": "int8, per output channel", "activations": "uint8"
}

# The check: short and long captions, punctuation, non-English text, one cut at the token limit (added
# by min_cosine), as queries come.
CHECK_TEXTS = (
    *CHECK_CAPTIONS,
    "a bell rings twice, then a dog barks",
    "people talk quietly in a busy restaurant while dishes clatter",
    "heavy rain",
    "A MOTORCYCLE ENGINE REVS UP AND DRIVES AWAY!!!",
    "water drips slowly into a metal bucket in an empty room",
    "birds chirp in the morning as the wind rustles the leaves of the trees nearby",
    "a crowd cheers and applauds at the end of a concert",
    "footsteps on gravel",
    "a train passes over a bridge, its horn blowing twice in the distance",
    "un chien aboie sous la pluie",
    "12 beeps, 3 s apart",
    "someone types on a keyboard; a phone rings; the typing stops",
)


def int8_dir(tower: str | os.PathLike) -> Path:
    return Path(tower) / INT8_DIR


def find_int8_tower(tower: str | os.PathLike) -> Path | None:
    """The int8 tower of a float32 TOWER folder when it is complete and of the same weights, else None."""
    meta, meta8 = read_meta(tower), read_meta(int8_dir(tower))
    if meta is None or meta8 is None or meta8.get("precision") != "int8":
        return None
    return int8_dir(tower) if meta8.get("weights_sha256") == meta.get("weights_sha256") else None


def min_cosine(reference: OnnxTextEncoder, other: OnnxTextEncoder, texts=CHECK_TEXTS) -> float:
    """The smallest cosine between two towers' embeddings of ``texts`` (and one text cut at the token
    limit), each alone and as one padded batch (padding must stay masked out in both)."""
    texts = [*texts, "birds singing " * reference.max_text_tokens]
    a, b = reference.encode_text(texts), other.encode_text(texts)  # (B, D) unit norm each
    alone = np.concatenate([other.encode_text([t]) for t in texts])
    return float(min((a * b).sum(1).min(), (a * alone).sum(1).min()))


def quantize_text_tower(tower: str | os.PathLike) -> Path:
    """Write TOWER/int8 (replaced) from the float32 tower in ``tower``; returns its folder.

    Refused (ClothoRetrieveError, nothing left behind) when the graph cannot be quantized or its
    embeddings fall below :data:`MIN_COSINE` of the float32 ones on this CPU."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tower = Path(tower)
    meta = read_meta(tower)
    if meta is None or meta.get("precision", "fp32") != "fp32":
        raise ClothoRetrieveError(f"{tower}: not a complete float32 ONNX text tower; export it again")
    out = int8_dir(tower)
    with _new_folder(out) as tmp:
        raw = tmp / "quantized.onnx"
        logging.disable(logging.WARNING)  # the quantizer's advice to pre-process, on the root logger
        try:
            quantize_dynamic(
                tower / GRAPH_FILE, raw, op_types_to_quantize=["MatMul"], per_channel=True,
                weight_type=QuantType.QInt8,
                # the graph holds onnxruntime's fused operators, which ONNX shape inference cannot type
                extra_options={"DefaultTensorType": 1, "MatMulConstBOnly": True},  # 1: FLOAT
            )
            _optimize(raw, tmp / GRAPH_FILE)  # fuses quantize + integer MatMul + rescale per product
        except Exception as exc:  # onnx and onnxruntime raise many kinds; the first line says why
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ClothoRetrieveError(f"{tower}: cannot quantize the text tower to int8 ({first})") from None
        finally:
            logging.disable(logging.NOTSET)
        raw.unlink()
        shutil.copyfile(tower / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        meta8 = {**meta, "precision": "int8", "quantization": QUANTIZATION}
        (tmp / META_FILE).write_text(json.dumps(meta8, indent=2) + "\n", encoding="utf-8")
        cosine = min_cosine(OnnxTextEncoder(tower), OnnxTextEncoder(tmp))
        if not cosine >= MIN_COSINE:
            raise ClothoRetrieveError(
                f"{tower}: the int8 text tower's embeddings differ from float32 ones (cosine down to "
                f"{cosine:.4f} < {MIN_COSINE}); keep float32"
            )
        meta8["check_min_cosine"] = round(cosine, 5)
        (tmp / META_FILE).write_text(json.dumps(meta8, indent=2) + "\n", encoding="utf-8")
    return out


def ensure_int8_tower(tower: str | os.PathLike) -> Path:
    """TOWER/int8, quantized now unless a current one is there (ClothoRetrieveError when it cannot be)."""
    found = find_int8_tower(tower)
    if found is not None:
        return found
    try:
        return quantize_text_tower(tower)
    except OSError as exc:  # e.g. an index folder the server may not write to
        why = exc.strerror or str(exc)
        raise ClothoRetrieveError(f"{tower}: cannot write its int8 text tower ({why})") from None


def open_serving_tower(
    index_dir: str | os.PathLike, weights_sha256: str, precision: str = "int8", threads: int | None = 1
) -> OnnxTextEncoder | None:
    """An index's ONNX text tower for a long-lived server (weights prepacked: slower to load, ~2x faster
    per query), in ``precision``; None when the index has no current ONNX tower (the caller uses torch).

    int8: quantized now if the index has none yet, and checked against float32 on this CPU; when it
    cannot be made or fails the check, the float32 tower after a one-line warning."""
    from rich.markup import escape

    from clotho_retrieve.utils import err_console

    if precision not in PRECISIONS:
        raise ClothoRetrieveError(f"text precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    folder = find_text_tower(index_dir, weights_sha256)
    if folder is None:
        return None
    if precision == "int8":
        try:
            int8 = OnnxTextEncoder(ensure_int8_tower(folder), threads=threads, prepack=True)
            cosine = min_cosine(OnnxTextEncoder(folder), int8)
            if cosine >= MIN_COSINE:
                return int8
            raise ClothoRetrieveError(
                f"on this CPU its embeddings differ from float32 ones (cosine down to {cosine:.4f})"
            )
        except ClothoRetrieveError as exc:
            err_console.print(
                f"[yellow]warning:[/] {escape(f'int8 text tower unusable, serving float32: {exc}')}",
                soft_wrap=True,
            )
    return OnnxTextEncoder(folder, threads=threads, prepack=True)
