"""A bf16 GGUF of a GGUF's dequantized weights (2-D tensors in bf16, the rest f32), same
metadata: the peer for `tsq ... --dtype bf16` on the CPU is llama.cpp on this file (see
docs/benchmarks.md, twentieth session). Needs the `gguf` package (the peers' virtualenv).

Usage: python scripts/make_bf16_gguf.py IN.gguf OUT.gguf
"""
import sys

import gguf
import numpy as np
from gguf.quants import dequantize, quantize


def main():
    src, out = sys.argv[1], sys.argv[2]
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(out, arch="llama")
    for field in r.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vt = field.types[0]
        st = field.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        val = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            val = int(gguf.LlamaFileType.MOSTLY_BF16)
        w.add_key_value(field.name, val, vt, sub_type=st)
    for t in r.tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        a = a.reshape([int(x) for x in reversed(t.shape)])
        if a.ndim == 2:
            q = quantize(a, gguf.GGMLQuantizationType.BF16)
            w.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(t.name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(out)


if __name__ == "__main__":
    main()
