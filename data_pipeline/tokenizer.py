"""The project's tokenizer: a sentencepiece model with fixed special ids (the contract the launcher codes against).

ids: unk 0, bos 1, eos 2, pad 3; the end-of-document token (EOD) is eos = 2. `encode` adds neither BOS nor EOS.
"""
from __future__ import annotations

import os

import numpy as np
import sentencepiece as spm

from data_pipeline.errors import DatasetError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
EOD_ID = EOS_ID


class Tokenizer:
    """Thin wrapper over `sentencepiece.SentencePieceProcessor` with the project's conventions."""

    def __init__(self, model_path: str):
        self.path = str(model_path)
        if not os.path.isfile(self.path):
            raise DatasetError(f"{self.path}: tokenizer model not found; train one with "
                               f"`python -m data_pipeline.train_tokenizer --input CORPUS --model-prefix PREFIX`")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise DatasetError(f"{self.path}: not a sentencepiece model ({e}); train one with "
                               f"`python -m data_pipeline.train_tokenizer`") from None
        if self.sp.eos_id() != EOD_ID:
            raise DatasetError(f"{self.path}: eos id is {self.sp.eos_id()}, expected {EOD_ID} (the EOD token); "
                               f"train the model with `python -m data_pipeline.train_tokenizer`")
        self.vocab_size = self.sp.get_piece_size()
        self.eod_id = EOD_ID

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def encode_batch_numpy(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Like encode_batch but returns int32 arrays (no Python int objects: much cheaper to write out)."""
        return self.sp.encode(list(texts), num_threads=num_threads, return_type="numpy")

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"
