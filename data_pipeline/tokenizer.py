"""The project's tokenizer over a sentencepiece `.model`, a Hugging Face `tokenizer.json`, or an HF tokenizer directory.

EOD is the tokenizer's own eos, never a constant. `encode` adds no special tokens (as Megatron's preprocessing);
`save(dir)` writes a self-contained copy that `Tokenizer(returned path)` reopens.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from data_pipeline.atomic import write_bytes
from data_pipeline.errors import DatasetError

HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# conventional end-of-text tokens (GPT-2/GPT-NeoX/Qwen, Llama 2/Mistral/T5, Llama 3, Gemma): used only when no
# tokenizer_config.json / special_tokens_map.json says which token is eos
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
_HOW = "give a sentencepiece .model, a Hugging Face tokenizer.json or a directory holding one"


class Tokenizer:
    """One interface over sentencepiece and Hugging Face tokenizers.

    Attributes: `path` (as given), `kind` ("sentencepiece" or "huggingface"), `vocab_size` (ids are < it),
    `eod_id` (= the eos id), `bos_id` and `pad_id` (None when the tokenizer has none), `file` (the file whose bytes
    define the ids: the .model, or the tokenizer.json) and `fingerprint` (the sha256 of that file's bytes)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        p = Path(path)
        if p.is_dir():
            self._impl = _HuggingFace(_tokenizer_json_in(p), self.path)
        elif not p.is_file():
            raise DatasetError(f"{self.path}: tokenizer model not found; train one with "
                               f"`python -m data_pipeline.train_tokenizer --input CORPUS --model-prefix PREFIX` "
                               f"or {_HOW}")
        elif _is_json(p):
            self._impl = _HuggingFace(p, self.path)
        else:
            self._impl = _SentencePiece(p)
        self.kind = self._impl.kind
        self.vocab_size: int = self._impl.vocab_size
        self.eod_id: int = self._impl.eos_id
        self.bos_id: int | None = self._impl.bos_id
        self.pad_id: int | None = self._impl.pad_id
        self.file = Path(self._impl.file)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer file's bytes: equal for a copy (the run directory's), different for any other
        tokenizer, also one of the same vocabulary size."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self.file.read_bytes()).hexdigest()
        return self._fingerprint

    @property
    def sp(self):
        """The `sentencepiece.SentencePieceProcessor` (sentencepiece tokenizers only)."""
        return self._impl.sp

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return [a.tolist() for a in self.encode_batch_numpy(texts, num_threads)]

    def encode_batch_numpy(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """One int32 array of ids per text (no Python int objects: much cheaper to write out). Both libraries
        encode in native threads that release the GIL: sentencepiece in `num_threads`, HF tokenizers in its own
        pool (RAYON_NUM_THREADS threads, default all cores; fixed at its first use in the process)."""
        return self._impl.encode_batch_numpy(list(texts), num_threads)

    def decode(self, ids) -> str:
        """Text of `ids`; special tokens (EOD, BOS, padding) decode to nothing."""
        return self._impl.decode([int(i) for i in ids])

    def save(self, dest_dir: str | os.PathLike) -> str:
        """Copy the tokenizer into `dest_dir` (created if needed): `tokenizer.model` for sentencepiece, the HF
        files (tokenizer.json, tokenizer_config.json naming the eos, special_tokens_map.json) otherwise. Each file
        is written under a temporary name and renamed. Returns the path to give `Tokenizer` to reopen the copy."""
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        return str(self._impl.save(dest))

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, {self.kind}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


def _is_json(path: Path) -> bool:
    """A tokenizer.json starts with '{'; a sentencepiece model is a binary protobuf (never starts with it)."""
    with open(path, "rb") as f:
        return f.read(64).lstrip()[:1] == b"{"


def _tokenizer_json_in(directory: Path) -> Path:
    path = directory / "tokenizer.json"
    if path.is_file():
        return path
    hint = f"; for a sentencepiece model pass the file itself ({directory / 'tokenizer.model'})" \
        if (directory / "tokenizer.model").is_file() else ""
    raise DatasetError(f"{directory}: no tokenizer.json in this directory (a Hugging Face tokenizer directory "
                       f"needs one: save it with the tokenizer's save_pretrained){hint}; or {_HOW}")


class _SentencePiece:
    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.file = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise DatasetError(f"{path}: neither a sentencepiece model nor a Hugging Face tokenizer.json "
                               f"({str(e).strip()}); {_HOW}") from None
        if self.sp.eos_id() < 0:
            raise DatasetError(f"{path}: this sentencepiece model has no eos token (eos_id -1), which ends every "
                               f"document; train it with an eos (eos_id=2, as `python -m "
                               f"data_pipeline.train_tokenizer` does)")
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None

    def encode_batch_numpy(self, texts, num_threads):
        return self.sp.encode(texts, num_threads=num_threads, return_type="numpy")

    def decode(self, ids):
        return self.sp.decode(ids)

    def save(self, dest: Path) -> Path:
        out = dest / "tokenizer.model"
        if out.resolve() != self.file.resolve():
            write_bytes(out, self.file.read_bytes())
        return out


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class _HuggingFace:
    kind = "huggingface"

    def __init__(self, json_path: Path, given: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.json_path = self.file = json_path
        try:
            self.tok = HFTokenizer.from_file(str(json_path))
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise DatasetError(f"{json_path}: not a Hugging Face tokenizer.json ({str(e).strip()[:200]}); "
                               f"{_HOW}") from None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.configs = {}  # file name -> its JSON (tokenizer_config.json, special_tokens_map.json beside it)
        for name in HF_FILES[1:]:
            f = json_path.parent / name
            if f.is_file():
                try:
                    self.configs[name] = json.loads(f.read_text(encoding="utf-8"))
                except (ValueError, UnicodeDecodeError) as e:
                    raise DatasetError(f"{f}: not valid JSON ({e}); fix or delete it") from None
        self.eos_token = self._declared("eos_token") or self._conventional_eos(given)
        self.eos_id = self._id_of(self.eos_token, "eos_token")
        self.bos_token, self.pad_token = self._declared("bos_token"), self._declared("pad_token")
        self.bos_id = self._id_of(self.bos_token, "bos_token") if self.bos_token else None
        self.pad_id = self._id_of(self.pad_token, "pad_token") if self.pad_token else None

    def _declared(self, key: str) -> str | None:
        for name in HF_FILES[1:]:
            token = _token_name(self.configs.get(name, {}).get(key))
            if token:
                return token
        return None

    def _conventional_eos(self, given: str) -> str:
        specials = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        found = [t for t in EOS_CANDIDATES if t in specials]
        if len(found) == 1:
            return found[0]
        where = self.json_path.parent / "tokenizer_config.json"
        raise DatasetError(f"{given}: no eos token (the end-of-document token): "
                           f"{'none of' if not found else 'several of'} {list(EOS_CANDIDATES)} among its special "
                           f"tokens and no tokenizer_config.json / special_tokens_map.json names one; write "
                           f'{{"eos_token": "<the token>"}} to {where}')

    def _id_of(self, token: str, key: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise DatasetError(f"{self.json_path.parent}: {key} {token!r} (from its tokenizer_config.json / "
                               f"special_tokens_map.json) is not in {self.json_path.name}; set {key} to one of "
                               f"its tokens")
        return i

    def encode_batch_numpy(self, texts, num_threads):
        # the library's own parallel batch encoder (no offsets: the fast variant); order is the input order
        return [np.array(e.ids, dtype=np.int32) for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)

    def save(self, dest: Path) -> Path:
        specials = {k: v for k, v in (("eos_token", self.eos_token), ("bos_token", self.bos_token),
                                      ("pad_token", self.pad_token)) if v}
        config = dict(self.configs.get("tokenizer_config.json") or {
            "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False})
        config.setdefault("eos_token", self.eos_token)  # so the copy names its eos even if found by convention
        special_map = dict(self.configs.get("special_tokens_map.json") or specials)
        special_map.setdefault("eos_token", self.eos_token)
        if dest.resolve() != self.json_path.parent.resolve():
            write_bytes(dest / "tokenizer.json", self.json_path.read_bytes())
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
            write_bytes(dest / name, (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode())
        return dest

