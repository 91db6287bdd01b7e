"""Write a GGUF's weights dequantized to float32, bfloat16 or float16, for llama.cpp to run at kvserve's precision.

kvserve loads a quantized GGUF (the default model is Q4_1) by dequantizing every
tensor to its dtype. Given the original file, llama.cpp would multiply in Q4_1 —
a different precision, and far fewer bytes per weight — so a comparison would
say little about either engine. `export_gguf` writes the file llama.cpp should
run instead: the same metadata (architecture, hyperparameters, tokenizer), every
tensor dequantized with `gguf.quants.dequantize` (the function kvserve's loader
uses) and stored as F32, BF16 or F16.

The GGUF tensor layout is kept as it is (llama.cpp expects its own interleaved
q/k rows; only kvserve's loader permutes them for Hugging Face's layout). As
llama.cpp's converter does, 1-D tensors (norm weights, biases) stay F32 in a
BF16/F16 file; their values are rounded to the target type first, because kvserve
holds every tensor in its dtype, so both engines compute with the same numbers.

`exported_gguf` caches the result under ``<kvserve cache dir>/gguf``, keyed by the
source file's SHA-256 and the type, so a benchmark pays for the export once.
``python -m kvserve.bench.gguf_export [--dtype float32] [SOURCE]`` prints the
cached file's path (exporting it first if needed), e.g. to start llama-server on it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, Keys, LlamaFileType
from gguf.gguf_reader import ReaderField
from gguf.quants import dequantize, quantize

from kvserve import native

# kvserve dtype name -> (GGUF tensor type, general.file_type of a file of that type).
EXPORT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "float32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "bfloat16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "float16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
}

# Fields GGUFWriter writes itself: the header counts, and the architecture it is constructed with.
_WRITER_FIELDS = frozenset({Keys.General.ARCHITECTURE})


def export_type(dtype: Any) -> GGMLQuantizationType:
    """The GGUF tensor type of ``dtype`` (``"bfloat16"`` or ``torch.bfloat16``); ValueError for others."""
    name = _dtype_name(dtype)
    if name not in EXPORT_TYPES:
        raise ValueError(f"cannot export a GGUF as {name}; supported: {', '.join(EXPORT_TYPES)}")
    return EXPORT_TYPES[name][0]


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def matrix_types(path: str) -> Counter[str]:
    """How many of a GGUF's matrices (tensors of 2 or more dimensions) have each tensor type."""
    return Counter(t.tensor_type.name for t in GGUFReader(path).tensors if len(t.shape) > 1)


def needs_export(path: str, dtype: Any) -> bool:
    """Whether some matrix of the GGUF at ``path`` is not stored in ``dtype``."""
    return set(matrix_types(path)) != {export_type(dtype).name}


def export_gguf(source: str, out: str, dtype: Literal["float32", "bfloat16", "float16"] | str) -> str:
    """Write ``source``'s metadata and tensors, dequantized to ``dtype``, to ``out``; returns ``out``.

    The file appears at ``out`` only once complete (it is written next to it and renamed).
    """
    qtype = export_type(dtype)
    file_type = EXPORT_TYPES[_dtype_name(dtype)][1]
    reader = GGUFReader(source)
    if reader.byte_order != "I":
        raise ValueError(f"{source}: only little-endian GGUF files are supported here")
    arch_field = reader.fields.get(Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ValueError(f"{source} has no {Keys.General.ARCHITECTURE} field")
    with gguf_writer(out, str(bytes(arch_field.parts[-1]), "utf-8")) as writer:
        _copy_metadata(reader, writer, file_type)
        plan = [(tensor, _stored_type(tensor, qtype)) for tensor in reader.tensors]
        for tensor, stored in plan:
            shape = [int(d) for d in reversed(tensor.shape.tolist())]  # numpy order: rows last-but-one
            nbytes = int(np.prod(shape)) * (4 if stored == GGMLQuantizationType.F32 else 2)
            if stored == GGMLQuantizationType.BF16:  # the writer takes BF16 as raw bytes of a byte shape
                writer.add_tensor_info(tensor.name, [*shape[:-1], 2 * shape[-1]], np.dtype(np.uint8), nbytes,
                                       raw_dtype=stored)
            else:
                dt = np.dtype(np.float32 if stored == GGMLQuantizationType.F32 else np.float16)
                writer.add_tensor_info(tensor.name, shape, dt, nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor, stored in plan:  # one tensor in memory at a time
            writer.write_tensor_data(_converted(tensor, qtype, stored))
    return out


@contextmanager
def gguf_writer(out: str, arch: str) -> Iterator[GGUFWriter]:
    """A GGUFWriter on a partial file beside `out`, renamed to `out` once the block has written everything (so
    `out` never holds half a file); removed if the block raises."""
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    writer = GGUFWriter(partial, arch=arch)
    try:
        yield writer
        writer.close()
        os.replace(partial, out_path)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)


def _stored_type(tensor: Any, qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """F32 for 1-D tensors (llama.cpp's converter keeps norms and biases in F32), ``qtype`` otherwise."""
    return GGMLQuantizationType.F32 if len(tensor.shape) <= 1 else qtype


def _converted(tensor: Any, qtype: GGMLQuantizationType, stored: GGMLQuantizationType) -> np.ndarray:
    """``tensor`` dequantized, rounded to ``qtype`` and encoded as ``stored``, in numpy dimension order."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
    if qtype == GGMLQuantizationType.F32:
        return values
    encoded = quantize(values, qtype)
    if stored == qtype:
        return encoded
    # A 1-D tensor stored as F32 holds the values kvserve computes with: those rounded to its dtype.
    return np.ascontiguousarray(dequantize(encoded, qtype), dtype=np.float32).reshape(shape)


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, file_type: LlamaFileType) -> None:
    copy_metadata(reader, writer, {Keys.General.FILE_TYPE: int(file_type)})
    if Keys.General.FILE_TYPE not in reader.fields:
        writer.add_key_value(Keys.General.FILE_TYPE, int(file_type), GGUFValueType.UINT32)


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, overrides: dict[str, Any]) -> None:
    """Every metadata field of `reader` into `writer` (but those the writer writes itself), with the values in
    `overrides` in place of the file's."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _WRITER_FIELDS:
            continue
        value, vtype, sub_type = field_value(field)
        value = overrides.get(key, value)
        if key == Keys.General.ALIGNMENT:
            writer.data_alignment = int(value)
        if vtype == GGUFValueType.ARRAY and not value:
            # GGUFWriter cannot write an empty array; llama.cpp reads a missing key as absent.
            continue
        writer.add_key_value(key, value, vtype, sub_type)


def field_value(field: ReaderField) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """``(value, type, array item type)`` of a metadata field, in the form GGUFWriter.add_key_value takes.

    Strings stay raw bytes (GGUFWriter writes bytes as they are), so tokenizer
    entries that are not valid UTF-8 survive the copy unchanged.
    """
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        if len(field.types) > 2:
            raise ValueError(f"{field.name}: nested GGUF arrays are not supported")
        sub = field.types[1] if len(field.types) == 2 else GGUFValueType.UINT8
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, sub
        return [field.parts[i].tolist()[0] for i in field.data], main, sub
    if main == GGUFValueType.STRING:
        return bytes(field.parts[-1]), main, None
    return field.parts[-1].tolist()[0], main, None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_path(source: str, dtype: Any) -> Path:
    """Where the export of ``source`` at ``dtype`` is cached: ``<cache>/gguf/<stem>.<sha256[:16]>.<TYPE>.gguf``."""
    stem = Path(source).name.removesuffix(".gguf")
    return native.cache_dir() / "gguf" / f"{stem}.{file_sha256(source)[:16]}.{export_type(dtype).name}.gguf"


def exported_gguf(source: str, dtype: Any) -> tuple[str, bool]:
    """``(path, created)``: the cached export of ``source`` at ``dtype``, written now when ``created``."""
    path = cache_path(source, dtype)
    if path.is_file():
        return str(path), False
    return export_gguf(source, str(path), _dtype_name(dtype)), True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvserve.bench.gguf_export",
                                     description="Print the path of a GGUF dequantized to --dtype (cached).")
    parser.add_argument("source", nargs="?", default=None, help="GGUF file (default: kvserve's default model)")
    parser.add_argument("--dtype", default="float32", choices=sorted(EXPORT_TYPES))
    parser.add_argument("--out", default=None, help="write here instead of the cache")
    args = parser.parse_args(argv)
    source = args.source
    if source is None:
        from kvserve.models.default_model import default_model_path

        source = default_model_path()
    print(export_gguf(source, args.out, args.dtype) if args.out else exported_gguf(source, args.dtype)[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
