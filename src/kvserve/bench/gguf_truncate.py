"""Write a GGUF cut to its first N layers: a draft model for speculative decoding made from the target itself.

A draft must share the target's tokenizer; where no smaller model of the family is at hand (SmolLM2-135M is
the smallest of its), the target's own first layers with its embedding, final norm and head make one
(early exit, as self-speculative decoding does). The tensors keep their block formats byte for byte; only
`<arch>.block_count` changes.

    python -m kvserve.bench.gguf_truncate --layers 8 [SOURCE] --out draft.gguf
"""

from __future__ import annotations

import argparse
import re

from gguf import GGUFReader, Keys

from kvserve.bench.gguf_export import copy_metadata, gguf_writer

_BLOCK = re.compile(r"^blk\.(\d+)\.")


def truncate_gguf(source: str, out: str, num_layers: int) -> str:
    """Write `source` with only its first `num_layers` blocks to `out` (complete once it appears); returns `out`."""
    reader = GGUFReader(source)
    arch = str(bytes(reader.fields[Keys.General.ARCHITECTURE].parts[-1]), "utf-8")
    block_count = f"{arch}.block_count"
    layers = int(reader.fields[block_count].parts[-1][0])
    if not 1 <= num_layers <= layers:
        raise ValueError(f"num_layers must be in [1, {layers}] for {source}, got {num_layers}")
    with gguf_writer(out, arch) as writer:
        copy_metadata(reader, writer, {block_count: num_layers})
        for tensor in reader.tensors:
            block = _BLOCK.match(tensor.name)
            if block is None or int(block.group(1)) < num_layers:
                writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvserve.bench.gguf_truncate",
                                     description="Write a GGUF cut to its first --layers layers (a draft model).")
    parser.add_argument("source", nargs="?", default=None, help="GGUF file (default: kvserve's default model)")
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    source = args.source
    if source is None:
        from kvserve.models.default_model import default_model_path

        source = default_model_path()
    print(truncate_gguf(source, args.out, args.layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
