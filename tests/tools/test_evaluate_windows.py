"""evaluate's windows over a separate corpus (--split all): the corpus's documents in their own order, as one stream,
cut into whole windows that share one token; checked against a hand-made array."""
import numpy as np
import pytest

from data_pipeline.errors import DatasetError
from data_pipeline.indexed_dataset import write_dataset
from data_pipeline.indexed_dataset import IndexedDataset
from data_pipeline.samples import WindowStream


def test_split_all_windows_follow_the_documents_in_order(tmp_path):
    docs = [[10, 11, 12, 2], [20, 21, 2], [30, 31, 32, 33, 34, 2]]
    prefix = write_dataset(str(tmp_path / "c"), docs)
    stream = np.array([t for d in docs for t in d])                   # 13 tokens
    w = WindowStream.every_document(IndexedDataset(prefix))
    assert w.tokens == 13
    got = w.windows(4, max_windows=10)                                 # (13 - 1) // 4 = 3 windows of 5
    want = np.stack([stream[i * 4: i * 4 + 5] for i in range(3)])
    assert got.dtype == np.int64 and np.array_equal(got, want)
    assert np.array_equal(w.windows(4, max_windows=2), want[:2])
    with pytest.raises(DatasetError, match="fewer than one window of seq_len 13"):
        w.windows(13, max_windows=1)


def test_in_loop_validation_and_evaluate_score_the_same_windows_as_a_plain_loop(tmp_path):
    """One split, one mean-loss loop: the launcher's validation (two ranks, summed as its all-reduce does) and
    evidence.evaluate give the loss of a plain PyTorch loop over windows cut by hand from the held-out documents."""
    import torch
    import torch.nn.functional as F

    from data_pipeline.samples import GrowLengthSamples, split_documents
    from evidence.evaluate import perplexity, validation_windows
    from launcher.config import from_dict
    from launcher.data import TrainData
    from model import CausalLM, ModelConfig
    from model.model import mean_loss

    rng = np.random.default_rng(3)
    docs = [rng.integers(4, 120, size=int(n)).tolist() + [2] for n in rng.integers(3, 40, size=60)]
    prefix = write_dataset(str(tmp_path / "d"), docs)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_preset("tiny", vocab_size=128, attention="sdpa")).eval()
    L, n = 16, 9

    _, held_out = split_documents(len(docs), 0.2, 0)
    stream = np.array([t for d in held_out for t in docs[d]])  # the held-out documents in id order
    windows = torch.tensor(np.stack([stream[i * L:i * L + L + 1] for i in range(n)]))  # (n, L + 1)
    with torch.no_grad():
        logits = model(windows[:, :-1]).float()  # (n, L, V)
        want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()

    got, labels = perplexity(model, validation_windows(prefix, "run", 0.2), L, n, tokens_per_batch=3 * L)
    assert labels == n * L and got == pytest.approx(want, rel=1e-6)

    samples = GrowLengthSamples(prefix, [(8, 64)], seed=7, valid_fraction=0.2)
    cfg = from_dict({"data": {"valid_fraction": 0.2}})
    loss_sum, n_tok = 0.0, 0
    for rank in range(2):
        data = TrainData(cfg=cfg, prefix=prefix, tokenizer_path="", tokenizer=None, fingerprint="", rank=rank,
                         world=2, samples=samples)
        part = mean_loss(model, data.valid_batches(L, eval_tokens=n * L, tokens_per_batch=2 * L),
                         torch.device("cpu"))
        loss_sum, n_tok = loss_sum + part[0], n_tok + part[1]
    assert n_tok == n * L and loss_sum / n_tok == pytest.approx(want, rel=1e-6)
