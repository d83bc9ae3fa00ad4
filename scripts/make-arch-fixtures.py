"""Tiny random-weight models of each architecture tsq runs, with transformers' logits for them.

Writes tests/fixtures/arch/<name>/: an HF-layout directory (config.json, bf16 weights sharded
over several safetensors files as large checkpoints are, a word-level tokenizer.json,
tokenizer_config.json) and reference.json (token ids and the logits transformers computes from
those bf16 weights in f32); for Qwen3, SmolLM3, Mistral and Phi-3 also <name>.gguf, the same
weights as llama.cpp's converter names, permutes (SmolLM3, Mistral) and fuses (Phi-3) them, with
a SentencePiece vocabulary for Mistral and Phi-3. tests/arch.rs loads each with tsq and compares.

Each model exercises what sets its family apart: Llama 3's `llama3` rope scaling (with an
original context short enough that the frequencies fall in all three bands), the `yarn` (on
Qwen2) and `linear` (on Llama) rope scalings, Phi-3's fused q|k|v and gate|up matrices, Phi-3.5's
`longrope` (past and within its original context) and Phi-4-mini's partial rotation, Qwen2's q/k/v
biases and tied embeddings (with a sliding window configured but switched off, as Qwen2.5 ships
it), Qwen3's per-head q/k RMS norms and heads wider than hidden / heads (as in Qwen3-0.6B:
16 heads of 128 over a hidden size of 1024), SmolLM3's layers without rotary embeddings (every
fourth), Mistral's sliding window (the reference sequence fits inside it). transformers 5 writes
`rope_parameters` (theta and scaling together); the released Llama 3.x checkpoints have the
older `rope_theta` + `rope_scaling`, so the llama3 fixture is rewritten to that form before
transformers reloads it for the reference: both forms are covered.

Run with a Python that has torch, transformers, safetensors and tokenizers (the peers' venv, see
../shared/peers/README.md):  python scripts/make-arch-fixtures.py [NAME ...]  (default: all).
With LLAMA_PYTHON naming a Python that has llama-cpp-python (the peers' venv-llama), each GGUF
is also read by llama.cpp and the largest difference from transformers' logits printed.
"""

import json
import os
import pathlib
import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "arch"
VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=1,
)
# Gemma's fixtures share all but their attention scale and, for Gemma 3, its layers.
GEMMA = dict(**COMMON, head_dim=16, sliding_window=16, tie_word_embeddings=True, pad_token_id=None)
GEMMA2 = dict(**GEMMA, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, rope_theta=10000.0)
GEMMA3_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
}
# Phi-3.5's LongRoPE on the common shape (heads of 16: 8 divisors each).
LONGROPE = dict(
    **{**COMMON, "max_position_embeddings": 128},
    rope_theta=10000.0,
    tie_word_embeddings=False,
    pad_token_id=None,
    original_max_position_embeddings=32,
    rope_scaling={
        "rope_type": "longrope",
        "short_factor": [1.0, 1.05, 1.1, 1.3, 1.6, 2.0, 2.6, 3.2],
        "long_factor": [1.0, 1.2, 1.9, 3.5, 6.0, 9.0, 14.0, 20.0],
    },
)
MODELS = {
    "llama3": (
        LlamaForCausalLM,
        LlamaConfig(
            **COMMON,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config(
            **COMMON,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            sliding_window=8,
            use_sliding_window=False,
        ),
    ),
    "qwen3": (
        Qwen3ForCausalLM,
        Qwen3Config(
            **COMMON,
            head_dim=24,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            attention_bias=False,
            use_sliding_window=False,
        ),
    ),
    "smollm3": (
        SmolLM3ForCausalLM,
        # Four layers, so the default leaves one without rotary embeddings (the fourth).
        SmolLM3Config(
            **{**COMMON, "num_hidden_layers": 4},
            rope_theta=5000000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            pad_token_id=None,
        ),
    ),
    "mistral": (
        MistralForCausalLM,
        MistralConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False, sliding_window=16),
    ),
    # Qwen2.5 with YaRN, as its model cards tell users to set for long contexts: an original
    # context of 32 (the reference sequence runs to 64) and the attention factor derived.
    "yarn": (
        Qwen2ForCausalLM,
        Qwen2Config(
            **COMMON,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            use_sliding_window=False,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    # Phi-3 (mini / medium, 4k context): q|k|v and gate|up each stored as one fused matrix,
    # a sliding window as Phi-3-mini-4k configures one (2047 of 4096; here 16, which the
    # 64-token reference runs past).
    "phi3": (
        Phi3ForCausalLM,
        Phi3Config(
            **COMMON,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            sliding_window=16,
            pad_token_id=None,
        ),
    ),
    # Phi-3.5 / Phi-3 128k: LongRoPE, a divisor per frequency, the short ones within the
    # original context (32 here; 4096 in the releases) and the long ones past it (the reference
    # runs to 64), cos and sin scaled by √(1 + ln(128 / 32) / ln 32) = 1.18. Written as the releases'
    # config.json is (`rope_scaling` with `type`, the original context at the top level).
    "longrope": (Phi3ForCausalLM, Phi3Config(**LONGROPE)),
    # The same model on a sequence within the original context: the short divisors.
    "longrope_short": (Phi3ForCausalLM, Phi3Config(**LONGROPE)),
    # Phi-4-mini: LongRoPE on three quarters of each head (12 of 16 dimensions rotated, 6
    # divisors each), the rest passed through.
    "phi4mini": (
        Phi3ForCausalLM,
        Phi3Config(
            **{
                **LONGROPE,
                "partial_rotary_factor": 0.75,
                "rope_scaling": {
                    "rope_type": "longrope",
                    "short_factor": [1.0, 1.1, 1.4, 1.9, 2.5, 3.0],
                    "long_factor": [1.0, 1.5, 3.0, 6.0, 11.0, 16.0],
                },
            }
        ),
    ),
    # Gemma 2: √hidden embeddings, (1 + w) norms, norms after attention and MLP, GELU, an
    # attention scale of its own (24 against heads of 16), soft caps low enough to bite on
    # these weights, sliding-window layers (every other; a window of 16 in 64 tokens).
    "gemma2": (
        Gemma2ForCausalLM,
        Gemma2Config(**GEMMA2, query_pre_attn_scalar=24),
    ),
    # Gemma 3 (text): Gemma 2's shape without soft caps, with per-head q/k norms and its
    # sliding-window layers rotating with a base of their own, the global ones scaled (linear, 8,
    # as Gemma 3 4B and larger).
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig(
            **GEMMA,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters=GEMMA3_ROPE,
        ),
    ),
    # Gemma as llama.cpp's GGUFs can hold it: the attention scale is head_dim's (llama.cpp
    # derives it from the model's size, not from the file), and Gemma 3's sliding-window layers
    # follow its release pattern (five of every six), scaled globally (linear, 8).
    "gemma2_gguf": (
        Gemma2ForCausalLM,
        Gemma2Config(**GEMMA2, query_pre_attn_scalar=16),
    ),
    "gemma3_gguf": (
        Gemma3ForCausalLM,
        Gemma3TextConfig(
            **{**GEMMA, "num_hidden_layers": 6},
            query_pre_attn_scalar=16,
            rope_parameters=GEMMA3_ROPE,
        ),
    ),
    "linear": (
        LlamaForCausalLM,
        LlamaConfig(
            **COMMON,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            rope_scaling={"rope_type": "linear", "factor": 2.0},
        ),
    ),
}
# One sequence per model, ids avoiding the special tokens 0 and 1: 64 positions (rope scaling
# shows at distance; Phi-3's and Gemma's windows of 16 are passed), Mistral's inside its window
# of 16 (its GGUF, converted as a Llama, has no window).
IDS = [2 + (i * 37 + 11) % (VOCAB - 2) for i in range(64)]
LENGTH = {"mistral": 16, "longrope_short": 30}
# Also written as a GGUF file beside the directory (tests/fixtures/arch/NAME.gguf).
GGUF = {"qwen3", "smollm3", "mistral", "phi3", "gemma2_gguf", "gemma3_gguf"}
# Converted as llama.cpp's LlamaModel converts: q/k rows permuted (Qwen's and Phi-3's are not).
PERMUTED = {"smollm3", "mistral"}
# With a SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`), as Mistral 7B's and
# Phi-3's GGUFs have; the others get a byte-level BPE list.
SENTENCEPIECE = {"mistral", "phi3", "gemma2_gguf", "gemma3_gguf"}


def tokenizer(directory: pathlib.Path) -> None:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "t0", "eos_token": "t1", "add_bos_token": False}, indent=1)
    )


def legacy_rope_config(path: pathlib.Path) -> None:
    """`rope_parameters` as the transformers 4 checkpoints on the hub write it (Phi-3's keeps
    LongRoPE's original context at the top level and names the kind `type`)."""
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type") == "longrope":
        config["original_max_position_embeddings"] = rope.pop("original_max_position_embeddings")
        rope["type"] = rope.pop("rope_type")
        partial = rope.pop("partial_rotary_factor", 1.0)
        if partial != 1.0:
            config["partial_rotary_factor"] = partial
    config["rope_scaling"] = rope
    path.write_text(json.dumps(config, indent=2))


def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives Llama-family q/k weights: each head's rows,
    as (2, head_dim / 2) halves, stored as (head_dim / 2, 2) pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def sentencepiece_vocabulary(writer, space_prefix: bool) -> None:
    """A SentencePiece vocabulary of VOCAB pieces: <unk>, <s>, </s>, then pieces from which
    "▁t0".."▁t111" merge ("▁" + "t" → "▁t", "▁t" + "1" → "▁t1", ...), scored by id; Gemma's
    puts no space in front of text."""
    import gguf

    pieces = ["<unk>", "<s>", "</s>", "\u2581", "t", *"0123456789", "\u2581t"]
    pieces += [f"\u2581t{i}" for i in range(VOCAB - len(pieces))]
    kinds = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([-float(i) for i in range(VOCAB)])
    writer.add_token_types(kinds + [gguf.TokenType.NORMAL] * (VOCAB - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if not space_prefix:
        writer.add_add_space_prefix(False)


def byte_level_vocabulary(writer) -> None:
    """The word-level names, but for three tokens and one merge: a BPE vocabulary needs merges."""
    import gguf

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    tokens = [f"t{i}" for i in range(VOCAB)]
    tokens[2:5] = ["a", "b", "ab"]
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * (VOCAB - 2))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)


LLAMA_LOGITS = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, ids = sys.argv[1], json.loads(sys.argv[2])
llm = Llama(model_path=path, logits_all=True, n_ctx=256, verbose=False)
llm.eval(ids)
print(json.dumps(np.asarray(llm.scores[: len(ids)]).tolist()))
"""


def llama_cpp_difference(path: pathlib.Path, reference: dict, window: int) -> str:
    """The largest difference between llama.cpp's logits for the GGUF at `path` and
    transformers', within the first `window` positions and over all (only with LLAMA_PYTHON
    naming a Python that has llama-cpp-python): llama-cpp-python 0.3.36 does not apply Phi-3's
    sliding window, which transformers does."""
    import subprocess

    python = os.environ["LLAMA_PYTHON"]
    done = subprocess.run([python, "-c", LLAMA_LOGITS, str(path), json.dumps(reference["ids"])],
                          capture_output=True, text=True, check=True)
    difference = (torch.tensor(json.loads(done.stdout)) - torch.tensor(reference["logits"])).abs()
    return f"{difference[:window].max().item():.2e} in the first {window}, {difference.max().item():.2e} in all"


def write_gguf(name: str, model, config) -> pathlib.Path:
    """The model as llama.cpp's converter writes it (tensor names from the gguf package's own
    map, f16 weights: exact for bf16 values), with a vocabulary of the same size."""
    import gguf

    arch = {
        "qwen3": gguf.MODEL_ARCH.QWEN3,
        "smollm3": gguf.MODEL_ARCH.SMOLLM3,
        "mistral": gguf.MODEL_ARCH.LLAMA,  # llama.cpp converts Mistral 7B as a Llama
        "phi3": gguf.MODEL_ARCH.PHI3,
        "gemma2_gguf": gguf.MODEL_ARCH.GEMMA2,
        "gemma3_gguf": gguf.MODEL_ARCH.GEMMA3,
    }[name]
    gemma = name.startswith("gemma")
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    path = OUT / f"{name}.gguf"
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = config.rope_parameters
    rope = rope.get("full_attention", rope)  # Gemma 3: the global layers'
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if name == "phi3" or gemma:
        writer.add_sliding_window(config.sliding_window)
    if name == "gemma2_gguf":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if name in SENTENCEPIECE:
        sentencepiece_vocabulary(writer, space_prefix=not gemma)
    else:
        byte_level_vocabulary(writer)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        mapped = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name in PERMUTED and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            tensor = llama_cpp_permute(tensor, heads)
        # llama.cpp's Gemma converter stores norms as 1 + w, the factor its norm multiplies by.
        if gemma and hf_name.endswith("norm.weight"):
            tensor = tensor + 1
        # As llama.cpp's converter: matrices in f16, vectors (norms, biases) in f32.
        dtype = torch.float16 if tensor.dim() > 1 else torch.float32
        writer.add_tensor(mapped, tensor.to(dtype).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make(name: str, cls, config) -> None:
    torch.manual_seed(len(name))
    model = cls(config).eval()
    # Weights of a trained model's size (random init is ~0.02), so the layers matter.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    directory = OUT / name
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*"):
        old.unlink()
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="40KB")
    tokenizer(directory)
    if name in ("llama3", "longrope", "longrope_short", "phi4mini"):
        legacy_rope_config(directory / "config.json")
    # The reference computes in f32 from the bf16 weights, as tsq does with `dtype: f32`.
    model = cls.from_pretrained(directory, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ids = IDS[: LENGTH.get(name, len(IDS))]
        logits = model(torch.tensor([ids])).logits[0]
    reference = {
        "ids": ids,
        "logits": [[round(v, 5) for v in row] for row in logits.tolist()],
    }
    (directory / "reference.json").write_text(json.dumps(reference))
    if name in GGUF:
        path = write_gguf(name, model, config)
        if os.environ.get("LLAMA_PYTHON"):
            window = getattr(config, "sliding_window", None) or len(reference["ids"])
            print(f"{name}.gguf: llama.cpp within {llama_cpp_difference(path, reference, window)}")
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    print(f"{name}: {len(shards)} weight files, logits {tuple(logits.shape)}")


if __name__ == "__main__":
    for name in sys.argv[1:] or MODELS:
        make(name, *MODELS[name])
