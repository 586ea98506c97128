"""Adapter transport codecs: how the tensors of one ``ArrayRecord`` travel on the wire.

Each direction has its own codec (``federation.transport_down`` for the server's payloads,
``federation.transport_up`` for the clients' replies). A tensor under the base key ``<key>``
(``adapter::<module>::A``, ``adapter::<module>::B``, ``frozen::<module>::A|B``,
``head::<param>``; see :mod:`fedtune.lora.records`) is carried as:

``fp32``
    ``<key>``: float32 (the default, and what checkpoints and exported adapters always hold).
``fp16``
    ``<key>``: float16, round to nearest even (11-bit significand, relative error at most
    2**-11; below 2**-14, absolute error at most 2**-25). Values beyond +-65504 become
    infinite, and the server rejects them as non-finite.
``bf16``
    ``<key>::bf16``: uint16 holding bfloat16 bit patterns (the upper half of the float32,
    round to nearest even; NumPy has no bfloat16 dtype, so the key's suffix marks it). float32's
    range, 8-bit significand: relative error at most 2**-8.
``int8``
    Matrices as ``<key>::q`` (int8, the tensor's shape) and ``<key>::scale`` (float32, one per
    slice), symmetric: ``scale = max|slice| / 127``, ``q = round(x / scale)`` in [-127, 127],
    decoded as ``q * scale``, so every entry is within ``scale / 2`` of the original (up to the
    float32 rounding of the product). A slice is a row of A, of the head matrices and of any
    other matrix, and a *column* of B: both factors then carry one scale per rank component
    (``r`` scales each), where per-row scales of B ``(out, r)`` would cost ``4 * out`` bytes,
    a quarter of B's fp32 size again at rank 4. All-zero slices have scale 0. Vectors and
    scalars (biases) stay ``<key>`` in float32: they are a negligible share of the bytes. So
    does a matrix too small to gain from int8 (``3 * entries <= 4 * scales + 256``: the bytes
    it would save do not pay for a second array's .npy header and key), e.g. a rank-2 factor of
    a 32-wide test model; the choice depends on the shape alone, so the server knows it.

:func:`encode` and :func:`decode` convert between base-key tensors and records;
:func:`expected_arrays` is what the server checks an encoded reply's metadata against before
anything is decoded (every key's shape and allowed dtypes), :func:`nominal_bytes` the raw
bytes a record of those shapes holds under a codec. :func:`encode_with_feedback` adds error
feedback for a client's replies: what a lossy codec could not carry (value minus decoded
value) is kept and added to the next reply before encoding, so that over any number of rounds
the decoded replies plus the last residual sum to the values the client meant to send.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = [
    "CODECS", "FLOAT_DTYPES", "SEP", "RecordError", "encode", "decode", "expected_arrays", "nominal_bytes",
    "encode_with_feedback", "residual_to_record", "residual_from_record",
]

SEP = "::"
CODECS = ("fp32", "fp16", "bf16", "int8")
FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})  # what the fp32 codec accepts from a peer
BF16_SUFFIX = f"{SEP}bf16"
Q_SUFFIX = f"{SEP}q"
SCALE_SUFFIX = f"{SEP}scale"
INT8_MAX = 127
INT8_OVERHEAD_BYTES = 256  # a second .npy header (128 bytes) and key, with room to spare


class RecordError(ValueError):
    """A record does not decode to a well-formed adapter; the message names the key."""


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown transport codec {codec!r}; expected one of {list(CODECS)}")


def _scale_axis(key: str) -> int:
    """The axis int8 scales run along: 1 (one scale per column) for a B factor, else 0 (per row)."""
    pieces = key.split(SEP)
    return 1 if len(pieces) == 3 and pieces[0] in ("adapter", "frozen") and pieces[2] == "B" else 0


def _as_matrix(x: np.ndarray, key: str) -> np.ndarray:
    """``x`` as a matrix whose rows are the int8 slices (a transposed view for a B factor)."""
    m = x.reshape(x.shape[0], -1)
    return m.T if _scale_axis(key) == 1 else m


def _quantize(x: np.ndarray, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float32 scale per slice (float64 arithmetic: the bound is exact)."""
    m = _as_matrix(x.astype(np.float64), key)
    with np.errstate(invalid="ignore", over="ignore"):
        scale = (np.abs(m).max(axis=1, initial=0.0) / INT8_MAX).astype(np.float32)
        s = scale.astype(np.float64)[:, None]
        ok = np.isfinite(s) & (s > 0)
        q = np.where(ok, np.rint(np.divide(m, s, out=np.zeros_like(m), where=ok)), 0.0)
    q = np.clip(np.nan_to_num(q), -INT8_MAX, INT8_MAX).astype(np.int8)  # a non-finite slice: q 0, scale nan/inf
    q = q.T if _scale_axis(key) == 1 else q
    return np.ascontiguousarray(q.reshape(x.shape)), scale


def _dequantize(q: np.ndarray, scale: np.ndarray, key: str) -> np.ndarray:
    m = _as_matrix(q, key).astype(np.float32) * scale[:, None]
    m = m.T if _scale_axis(key) == 1 else m
    return np.ascontiguousarray(m.reshape(q.shape))


def _int8_slices(key: str, shape: tuple[int, ...]) -> int:
    """The number of int8 scales of a matrix of ``shape`` under ``key``."""
    return int(shape[1]) if _scale_axis(key) == 1 else int(shape[0])


def _int8_pays(key: str, shape: tuple[int, ...]) -> bool:
    """Whether the int8 codec quantizes a tensor of ``shape``: a matrix whose 3 saved bytes an
    entry outweigh its scales and a second array's header and key (about 256 bytes)."""
    return len(shape) >= 2 and 3 * math.prod(shape) > 4 * _int8_slices(key, shape) + INT8_OVERHEAD_BYTES


def _to_bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _from_bf16_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float()


def encode(tensors: Mapping[str, torch.Tensor], codec: str = "fp32") -> ArrayRecord:
    """The record carrying ``tensors`` (base keys) under ``codec``."""
    _check_codec(codec)
    out: dict[str, Array] = {}
    for key, t in tensors.items():
        t = t.detach().float().cpu().contiguous()
        if codec == "fp32":
            out[key] = Array(t.numpy())
        elif codec == "fp16":
            with np.errstate(over="ignore"):  # beyond float16's range: inf, which the server rejects
                out[key] = Array(t.numpy().astype(np.float16))
        elif codec == "bf16":
            out[key + BF16_SUFFIX] = Array(_to_bf16_bits(t))
        elif not _int8_pays(key, tuple(t.shape)):
            out[key] = Array(t.numpy())
        else:
            q, scale = _quantize(t.numpy(), key)
            out[key + Q_SUFFIX] = Array(q)
            out[key + SCALE_SUFFIX] = Array(scale)
    return ArrayRecord(out)


def _load(record: ArrayRecord, key: str) -> np.ndarray:
    """One array as NumPy, its content checked against its own metadata."""
    arr = record[key]
    if not isinstance(arr, Array):
        raise RecordError(f"{key} is a {type(arr).__name__}, not an array")
    try:
        x = arr.numpy()
    except Exception as exc:  # noqa: BLE001 - any deserialisation failure is a malformed record
        raise RecordError(f"{key} cannot be decoded: {exc}") from exc
    if str(x.dtype) != arr.dtype or tuple(x.shape) != tuple(int(s) for s in arr.shape):
        raise RecordError(f"{key} decodes as {x.dtype} {tuple(x.shape)}, but claims {arr.dtype} {tuple(arr.shape)}")
    return x


def _need(key: str, x: np.ndarray, dtypes: frozenset[str]) -> None:
    if str(x.dtype) not in dtypes:
        raise RecordError(f"{key} has dtype {str(x.dtype)!r}, expected one of {sorted(dtypes)}")


def decode(record: ArrayRecord, codec: str = "fp32") -> dict[str, torch.Tensor]:
    """Base-key float32 tensors from a record encoded with ``codec``; raises :class:`RecordError`
    naming the key when a record is not a well-formed ``codec`` encoding (wrong dtypes, a q
    without its scale, a scale of the wrong length, non-finite or negative)."""
    _check_codec(codec)
    out: dict[str, torch.Tensor] = {}
    keys = list(record.keys())
    if codec == "int8":
        for key in keys:
            if key.endswith(SCALE_SUFFIX) and key[: -len(SCALE_SUFFIX)] + Q_SUFFIX not in record:
                raise RecordError(f"{key} has no {key[: -len(SCALE_SUFFIX)] + Q_SUFFIX}")
    for key in keys:
        if codec == "bf16":
            if not key.endswith(BF16_SUFFIX):
                raise RecordError(f"{key} is not a bf16 key (<key>{BF16_SUFFIX})")
            x = _load(record, key)
            _need(key, x, frozenset({"uint16"}))
            out[key[: -len(BF16_SUFFIX)]] = _from_bf16_bits(x)
        elif codec == "int8" and key.endswith(SCALE_SUFFIX):
            continue
        elif codec == "int8" and key.endswith(Q_SUFFIX):
            base = key[: -len(Q_SUFFIX)]
            if base + SCALE_SUFFIX not in record:
                raise RecordError(f"{key} has no {base + SCALE_SUFFIX}")
            q, scale = _load(record, key), _load(record, base + SCALE_SUFFIX)
            _need(key, q, frozenset({"int8"}))
            _need(base + SCALE_SUFFIX, scale, frozenset({"float32"}))
            if not _int8_pays(base, tuple(q.shape)):
                raise RecordError(f"{key} has shape {tuple(q.shape)}; int8 quantizes only matrices large enough")
            if scale.shape != (_int8_slices(base, q.shape),):
                raise RecordError(f"{base + SCALE_SUFFIX} has shape {tuple(scale.shape)}, expected "
                                  f"({_int8_slices(base, q.shape)},) for {key} of shape {tuple(q.shape)}")
            if not np.isfinite(scale).all() or (scale < 0).any():
                raise RecordError(f"{base + SCALE_SUFFIX} holds non-finite or negative scales")
            out[base] = torch.from_numpy(_dequantize(q, scale, base))
        else:
            x = _load(record, key)
            if codec == "int8":
                _need(key, x, frozenset({"float32"}))
                if _int8_pays(key, tuple(x.shape)):
                    raise RecordError(f"{key} is a float32 matrix; int8 carries it as {key}{Q_SUFFIX}")
            else:
                _need(key, x, frozenset({"float16"}) if codec == "fp16" else FLOAT_DTYPES)
            out[key] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return out


def expected_arrays(base_expected: Mapping[str, tuple[int, ...]],
                    codec: str = "fp32") -> dict[str, tuple[tuple[int, ...], frozenset[str]]]:
    """Every key a ``codec`` record of tensors of ``base_expected`` shapes holds, with its shape and
    the dtypes it may have (fp32 accepts any NumPy float, as a peer's float64 is exact)."""
    _check_codec(codec)
    out: dict[str, tuple[tuple[int, ...], frozenset[str]]] = {}
    for key, shape in base_expected.items():
        shape = tuple(int(s) for s in shape)
        if codec == "fp32":
            out[key] = (shape, FLOAT_DTYPES)
        elif codec == "fp16":
            out[key] = (shape, frozenset({"float16"}))
        elif codec == "bf16":
            out[key + BF16_SUFFIX] = (shape, frozenset({"uint16"}))
        elif not _int8_pays(key, shape):
            out[key] = (shape, frozenset({"float32"}))
        else:
            out[key + Q_SUFFIX] = (shape, frozenset({"int8"}))
            out[key + SCALE_SUFFIX] = ((_int8_slices(key, shape),), frozenset({"float32"}))
    return out


def nominal_bytes(base_expected: Mapping[str, tuple[int, ...]], codec: str = "fp32") -> int:
    """The raw data bytes (headers and keys excluded) of a ``codec`` record of these shapes (fp32:
    4 bytes an entry)."""
    return sum(math.prod(shape) * (4 if codec == "fp32" else np.dtype(next(iter(dtypes))).itemsize)
               for shape, dtypes in expected_arrays(base_expected, codec).values())


def encode_with_feedback(tensors: Mapping[str, torch.Tensor], codec: str,
                         residual: Mapping[str, torch.Tensor] | None) -> tuple[ArrayRecord, dict[str, torch.Tensor]]:
    """Encode ``tensors`` plus the earlier ``residual`` (where a key's shape matches; others start
    from zero, e.g. after a rank change); returns the record and the new residual, value minus
    decoded value, kept only for finite values (a diverged tensor must not haunt later rounds)."""
    residual = residual or {}
    values = {}
    for key, t in tensors.items():
        t = t.detach().float().cpu()
        r = residual.get(key)
        values[key] = t + r if r is not None and tuple(r.shape) == tuple(t.shape) else t
    record = encode(values, codec)
    if codec == "fp32":
        return record, {}
    new = {k: (v - _round_trip(k, v, codec)).contiguous() for k, v in values.items()}
    return record, {k: r for k, r in new.items() if bool(torch.isfinite(r).all()) and bool(r.any())}


def _round_trip(key: str, t: torch.Tensor, codec: str) -> torch.Tensor:
    """What the receiver decodes from ``t`` (no validation: a non-finite tensor stays non-finite)."""
    if codec == "fp16":
        return t.half().float()
    if codec == "bf16":
        return t.bfloat16().float()
    if codec == "int8" and _int8_pays(key, tuple(t.shape)):
        q, scale = _quantize(t.numpy(), key)
        with np.errstate(invalid="ignore", over="ignore"):
            return torch.from_numpy(_dequantize(q, scale, key))
    return t


def residual_to_record(residual: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(t.detach().float().cpu().contiguous().numpy()) for k, t in residual.items()})


def residual_from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v.numpy(), dtype=np.float32)) for k, v in record.items()}
