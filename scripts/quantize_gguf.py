"""Quantize a GGUF with llama.cpp's own quantizer (llama-cpp-python, the peers' venv-llama), for
serving the same weights to llama.cpp's server at another precision beside tsq:

    python scripts/quantize_gguf.py IN.gguf OUT.gguf [Q8_0]

IN is an f32 GGUF such as the one shared/peers/make_f32_gguf.py writes from the packaged model.
"""

import sys

import llama_cpp

source, target = sys.argv[1:3]
kind = sys.argv[3] if len(sys.argv) > 3 else "Q8_0"
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
if llama_cpp.llama_model_quantize(source.encode(), target.encode(), params) != 0:
    sys.exit(f"quantizing {source} to {kind} failed")
