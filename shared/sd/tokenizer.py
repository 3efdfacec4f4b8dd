"""The real CLIP BPE tokenizer, built offline.

No package ships a CLIP `vocab.json`/`merges.txt`, but `openai-clip` ships OpenAI's merge list
(`bpe_simple_vocab_16e6.txt.gz`). The vocabulary is derived from it exactly as OpenAI's `SimpleTokenizer` does,
so ids match SD1.x's tokenizer ("a photo of a dog" -> 49406 320 1125 539 320 1929 49407).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from transformers import CLIPTokenizer

N_MERGES = 49152 - 256 - 2  # OpenAI keeps the first 48,894 merges
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    # Printable stand-ins for every byte, the table GPT-2 and CLIP use.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def bpe_file() -> Path:
    spec = importlib.util.find_spec("clip")  # locates the package without importing it (it needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("openai-clip is not installed: it ships the CLIP BPE merges (pip install openai-clip==1.0.1)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"CLIP BPE merges not found at {path}")
    return path


def write_tokenizer_files(folder: Path) -> None:
    """Write vocab.json, merges.txt and the tokenizer config into `folder`."""
    lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=MAX_LENGTH)
    tok.save_pretrained(folder)


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if tok.model_max_length > 10_000:  # some saved configs carry "infinite": pipelines then overflow
        tok.model_max_length = MAX_LENGTH
    return tok
