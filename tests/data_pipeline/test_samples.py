"""GrowLengthSamples: exact windows, exactly-once across stage switches, shuffling, split, cache, errors."""
import os

import numpy as np
import pytest

from data_pipeline.errors import DatasetError, SamplePlanError
from data_pipeline.indexed_dataset import write_dataset
from data_pipeline.samples import GrowLengthSamples, check_stages, data_fingerprint


def unshuffled(s, stage):
    """All samples of a stage in stream order: (n, L+1)."""
    n = s.num_samples(stage)
    rows = s.samples(stage, np.arange(n))
    return rows[np.argsort(s.stream_positions(stage, np.arange(n)))]


@pytest.fixture
def one_doc(tmp_path):
    # one document 0..9 (its last token plays EOD): every epoch's stream is the same 10 tokens
    return write_dataset(str(tmp_path / "one"), [list(range(10))])


@pytest.fixture
def many_docs(tmp_path):
    # 40 documents of 2..8 tokens with globally unique ids (doc d holds 1000 + 100 d + j)
    docs = [[1000 + 100 * d + j for j in range(d % 7 + 2)] for d in range(40)]
    return write_dataset(str(tmp_path / "many"), docs), docs


def test_exact_windows_one_document(one_doc):
    s = GrowLengthSamples(one_doc, [(2, 4), (3, 6)], seed=0)
    assert s.num_samples(0) == 2 and s.num_samples(1) == 2
    assert unshuffled(s, 0).tolist() == [[0, 1, 2], [2, 3, 4]]
    # stage 1 starts at stream position 4 and crosses into epoch 2 (the plan needs 11 tokens of 10)
    assert unshuffled(s, 1).tolist() == [[4, 5, 6, 7], [7, 8, 9, 0]]
    assert s.num_epochs == 2 and s.sample(0, 0).dtype == np.int64 and s.sample(1, 1).shape == (4,)


def test_exactly_once_across_stage_switches(many_docs):
    prefix, docs = many_docs
    total = sum(map(len, docs))  # 40 docs, 195 tokens
    plan = [(2, 40), (4, 48), (8, 64), (3, 42)]  # 194 tokens: the +1 label is the epoch's last token
    s = GrowLengthSamples(prefix, plan, seed=7, epochs="error")
    labels = np.concatenate([unshuffled(s, k)[:, 1:].reshape(-1) for k in range(len(plan))])
    inputs = np.concatenate([unshuffled(s, k)[:, :-1].reshape(-1) for k in range(len(plan))])
    assert labels.tolist() == s.stream(1, 195).tolist()       # every stream token a label exactly once
    assert inputs.tolist() == s.stream(0, 194).tolist()
    epoch = s.stream(0, total)
    assert sorted(epoch.tolist()) == sorted(sum(docs, []))     # an epoch is every document once
    assert len(set(epoch.tolist())) == total
    # documents stay whole and in a seeded order within the epoch
    firsts = [t for t in epoch.tolist() if t % 100 == 0]
    assert sorted(firsts) == [1000 + 100 * d for d in range(40)] and firsts != sorted(firsts)


def test_windows_at_stage_boundary_overlap_by_one(many_docs):
    prefix, _ = many_docs
    s = GrowLengthSamples(prefix, [(4, 8), (2, 4)], seed=1)
    a, b = unshuffled(s, 0), unshuffled(s, 1)
    assert a[-1, -1] == b[0, 0]  # the next stage's first input is the previous stage's last label
    assert a[0, -1] == a[1, 0]


def test_shuffled_within_stage_and_deterministic(many_docs):
    prefix, _ = many_docs
    plan = [(1, 60), (2, 60)]
    s, again, other = (GrowLengthSamples(prefix, plan, seed=sd) for sd in (3, 3, 4))
    pos0 = s.stream_positions(0, np.arange(60))
    assert sorted(pos0.tolist()) == list(range(60)) and pos0.tolist() != list(range(60))
    pos1 = s.stream_positions(1, np.arange(30))
    assert sorted(pos1.tolist()) == list(range(60, 120, 2))
    assert np.array_equal(s.samples(1, np.arange(30)), again.samples(1, np.arange(30)))
    assert not np.array_equal(s.samples(0, np.arange(60)), other.samples(0, np.arange(60)))


def test_repeat_epochs_use_new_order(many_docs):
    prefix, docs = many_docs
    total = sum(map(len, docs))
    s = GrowLengthSamples(prefix, [(1, 3 * total)], seed=0)
    assert s.num_epochs == 4
    e0, e1 = s.stream(0, total), s.stream(total, 2 * total)
    assert sorted(e0.tolist()) == sorted(e1.tolist()) and e0.tolist() != e1.tolist()
    assert np.array_equal(unshuffled(s, 0)[:, 1], s.stream(1, 3 * total + 1))


def test_epochs_error(many_docs):
    prefix, _ = many_docs
    with pytest.raises(SamplePlanError, match=r"stage plan needs 201 tokens \(sum of stage tokens 200 \+ 1 for the "
                                              r"last label\), but .* has 195 training tokens per epoch .* "
                                              r"epochs='repeat'"):
        GrowLengthSamples(prefix, [(2, 200)], seed=0, epochs="error")


def test_split_documents_disjoint_and_valid_windows(many_docs):
    prefix, docs = many_docs
    s = GrowLengthSamples(prefix, [(2, 20)], seed=0, valid_fraction=0.25)
    assert len(s.valid_docs) == 10 and len(s.train_docs) == 30
    assert set(s.valid_docs) | set(s.train_docs) == set(range(40)) and not set(s.valid_docs) & set(s.train_docs)
    valid_stream = sum((docs[d] for d in s.valid_docs), [])
    train_tokens = set(s.stream(0, s.tokens_per_epoch).tolist())
    assert not train_tokens & set(valid_stream)
    v = s.validation.windows(4)
    n = (len(valid_stream) - 1) // 4
    assert v.shape == (n, 5)
    assert v.tolist() == [valid_stream[i * 4:i * 4 + 5] for i in range(n)]
    assert s.validation.windows(4, max_windows=2).tolist() == v[:2].tolist()
    # the split does not depend on the training seed
    assert GrowLengthSamples(prefix, [(2, 20)], seed=9, valid_fraction=0.25).valid_docs.tolist() == s.valid_docs.tolist()


def test_valid_errors(many_docs):
    prefix, _ = many_docs
    s = GrowLengthSamples(prefix, [(2, 20)], seed=0)
    with pytest.raises(DatasetError, match=r"the validation split \(valid_fraction 0.0\) has 0 tokens, fewer than one "
                                           r"window of seq_len 4 \+ 1; raise valid_fraction"):
        s.validation.windows(4)
    s2 = GrowLengthSamples(prefix, [(2, 20)], seed=0, valid_fraction=0.05)
    with pytest.raises(DatasetError, match="fewer than one window of seq_len 1000"):
        s2.validation.windows(1000)
    with pytest.raises(SamplePlanError, match="seq_len 0: must be positive"):
        s2.validation.windows(0)
    with pytest.raises(SamplePlanError, match=r"valid_fraction 1.5: must be in \[0, 1\)"):
        GrowLengthSamples(prefix, [(2, 20)], seed=0, valid_fraction=1.5)
    with pytest.raises(SamplePlanError, match="holds out 40 of 40 documents, leaving none to train on"):
        GrowLengthSamples(prefix, [(2, 20)], seed=0, valid_fraction=0.999)


@pytest.mark.parametrize("stages, message", [
    ([(128, 1000)], r"stage 0: tokens 1000 is not a multiple of seq_len 128: 1000 = 7 \* 128 \+ 104; use tokens "
                    r"896 or 1024"),
    ([], "empty stage plan"),
    ([(0, 10)], "seq_len 0 and tokens 10 must both be positive"),
    ([(2, 4, 6)], r"stage 0: \(2, 4, 6\) is not a \(seq_len, tokens\) pair"),
    ([(2.0, 4)], r"is not a \(seq_len, tokens\) pair of integers"),
])
def test_stage_plan_errors(stages, message):
    with pytest.raises(SamplePlanError, match=message):
        check_stages(stages)


def test_constructor_errors(many_docs, tmp_path):
    prefix, _ = many_docs
    with pytest.raises(SamplePlanError, match="seed -1: must be a non-negative integer"):
        GrowLengthSamples(prefix, [(2, 4)], seed=-1)
    with pytest.raises(SamplePlanError, match="epochs 'wrap': must be 'repeat' or 'error'"):
        GrowLengthSamples(prefix, [(2, 4)], seed=0, epochs="wrap")
    with pytest.raises(DatasetError, match="has no documents"):
        GrowLengthSamples(write_dataset(str(tmp_path / "empty"), []), [(2, 4)], seed=0)
    with pytest.raises(DatasetError, match="only 1 training tokens; add data"):
        GrowLengthSamples(write_dataset(str(tmp_path / "tiny"), [[5]]), [(2, 4)], seed=0)
    with pytest.raises(DatasetError, match="token dtype float32 is not an integer type"):
        GrowLengthSamples(write_dataset(str(tmp_path / "f"), [[1.5, 2.0]], np.float32), [(1, 1)], seed=0)
    s = GrowLengthSamples(prefix, [(2, 4)], seed=0)
    with pytest.raises(IndexError, match=r"sample 2 out of range for stage 0 \(2 samples\)"):
        s.sample(0, 2)
    with pytest.raises(IndexError, match="stage 1 out of range: the plan has 1 stages"):
        s.num_samples(1)
    with pytest.raises(IndexError, match=r"stream range \[0, 1000\) outside"):
        s.stream(0, 1000)
    with pytest.raises(DatasetError, match=r"nope\.idx: file not found"):
        data_fingerprint(str(tmp_path / "nope"))


def test_cache_build_load_and_key(many_docs, tmp_path):
    prefix, docs = many_docs
    cache = str(tmp_path / "cache")
    plan = [(2, 40), (4, 40)]
    rank0 = GrowLengthSamples(prefix, plan, seed=5, cache_dir=cache)
    rank1 = GrowLengthSamples(prefix, plan, seed=5, cache_dir=cache)
    with pytest.raises(DatasetError, match=r"sample index not built; call build\(\) on rank 0"):
        rank1.load()
    rank0.build()
    assert os.listdir(cache) == [os.path.basename(rank0.cache_path)]  # no temp dirs left
    rank1.load()
    assert isinstance(rank1.index["order_0"], np.memmap)
    assert np.array_equal(rank0.samples(1, np.arange(10)), rank1.samples(1, np.arange(10)))
    in_memory = GrowLengthSamples(prefix, plan, seed=5)
    assert np.array_equal(in_memory.samples(0, np.arange(20)), rank1.samples(0, np.arange(20)))
    rank0.build()  # idempotent: reuses the existing index
    key = rank0.cache_key
    assert GrowLengthSamples(prefix, plan, seed=5).cache_key == key
    assert GrowLengthSamples(prefix, plan, seed=6).cache_key != key
    assert GrowLengthSamples(prefix, [(2, 40), (4, 44)], seed=5).cache_key != key
    assert GrowLengthSamples(prefix, plan, seed=5, valid_fraction=0.1).cache_key != key
    assert GrowLengthSamples(prefix, plan, seed=5, split_seed=1).cache_key != key
    docs[3][0] += 1  # same sizes, one token changed
    changed = write_dataset(prefix, docs)
    assert GrowLengthSamples(changed, plan, seed=5).cache_key != key
    with pytest.raises(SamplePlanError, match="no cache_dir was given"):
        in_memory.load()


def test_corrupt_cache(many_docs, tmp_path):
    prefix, _ = many_docs
    s = GrowLengthSamples(prefix, [(2, 40)], seed=5, cache_dir=str(tmp_path)).build()
    open(os.path.join(s.cache_path, "order_0.npy"), "wb").write(b"junk")
    with pytest.raises(DatasetError, match=r"order_0\.npy: unreadable cached sample index .* delete .* and rebuild"):
        GrowLengthSamples(prefix, [(2, 40)], seed=5, cache_dir=str(tmp_path)).load()


def test_on_real_tokens(tokenized, sp_model):
    from data_pipeline.tokenizer import Tokenizer
    s = GrowLengthSamples(tokenized, [(16, 16 * 64), (64, 64 * 16)], seed=0, valid_fraction=0.1)
    rows = s.samples(1, np.arange(16))
    assert rows.shape == (16, 65) and rows.max() < Tokenizer(sp_model).vocab_size
    assert s.fingerprint.startswith(data_fingerprint(tokenized)) and "valid_fraction=0.1" in s.fingerprint
