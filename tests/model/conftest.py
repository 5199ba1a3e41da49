"""Fixtures for model tests: a small sentencepiece model with the project's conventions, trained once."""
import random

import pytest

from model import attention


@pytest.fixture(autouse=True)
def fresh_flash_functions():
    """flash-attn is resolved once per process; tests that swap `flash_attn` in sys.modules resolve it afresh."""
    attention.forget_flash()
    yield
    attention.forget_flash()

WORDS = ("the model grows its sequence length from short to long windows while rotary position embeddings "
         "extrapolate directly and attention cost grows with length pythia uses parallel residual blocks "
         "tokens per step stay constant across stages").split()


# sentencepiece's defaults (nmt_nfkc, whitespace cleanup) and data_pipeline/train_tokenizer.py's choices.
NORMALIZATIONS = {
    "spm-default": dict(),
    "project": dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                    allow_whitespace_only_pieces=True),
}


@pytest.fixture(scope="session", params=sorted(NORMALIZATIONS))
def sp_model_path(request, tmp_path_factory):
    """BPE, byte_fallback, unk 0 / bos 1 / eos 2 / pad 3 (EOD = eos), trained on ~8 KB of text."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [("  " if i % 7 == 0 else "") + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
             + f" {rng.randint(0, 9999)}." for i in range(120)]
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=300, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, split_digits=True,
        character_coverage=1.0, minloglevel=2, **NORMALIZATIONS[request.param])
    return d / "tok.model"

