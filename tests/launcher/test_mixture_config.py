"""data.sources and per-stage mixtures: both config forms, one-line refusals, and the shared-tokenizer check."""
import pytest

from data_pipeline.errors import DatasetError
from launcher.config import ConfigError, from_dict
from launcher.data import check_sources, prepare_data

STAGES = [{"seq_len": 64, "share": 0.8}, {"seq_len": 128, "share": 0.2, "mixture": {"web": 0.3, "books": 0.7}}]


def cfg(sources, stages=STAGES, **data):
    return from_dict({"data": {"sources": sources, "tokenizer": "tok.model", **data},
                      "growlength": {"stages": stages}})


def test_list_and_megatron_string_forms_are_the_same_mixture():
    listed = cfg([{"name": "web", "prefix": "d/web", "weight": 0.7},
                  {"name": "books", "prefix": "d/books", "weight": 0.3}])
    megatron = cfg("0.7 d/web 0.3 d/books")
    assert listed.data.source_list() == megatron.data.source_list() == [("web", "d/web", 0.7),
                                                                       ("books", "d/books", 0.3)]
    # a stage without mixture takes data.sources' weights; a named source left out of a mixture weighs 0
    assert megatron.stage_mixtures() == [{"web": 0.7, "books": 0.3}, {"web": 0.3, "books": 0.7}]
    partial = cfg("0.7 d/web 0.3 d/books", [{"seq_len": 64, "share": 1.0, "mixture": {"books": 2}}])
    assert partial.stage_mixtures() == [{"web": 0.0, "books": 2.0}]


def test_single_prefix_still_works():
    c = from_dict({"data": {"prefix": "d/web", "tokenizer": "tok.model"}})
    assert c.data.source_list() == []


@pytest.mark.parametrize("tree,message", [
    ({"data": {"sources": "0.7 d/web 0.3"}}, "expected weight/prefix pairs"),
    ({"data": {"sources": "0.7 d/web x d/books"}}, "'x' is not a weight"),
    ({"data": {"sources": "0.5 a/web 0.5 b/web"}}, "names ['web'] appear more than once"),
    ({"data": {"sources": "1 d/web", "prefix": "d/web"}}, "data.prefix and data.sources exclude each other"),
    ({"data": {"sources": []}}, "data.sources must be a non-empty list"),
    ({"data": {"sources": [{"name": "a", "prefix": "p", "weight": 0}]}}, "data.sources[0].weight must be a positive"),
    ({"data": {"sources": [{"name": "a", "prefix": "p"}]}}, "data.sources[0] must be a mapping with exactly name"),
    ({"data": {"sources": "1 d/web"}, "growlength": {"stages": [{"seq_len": 64, "share": 1.0,
                                                               "mixture": {"books": 1}}]}},
     "growlength.stages[0].mixture names ['books'], not in data.sources ['web']"),
    ({"data": {"sources": "1 d/web"}, "growlength": {"stages": [{"seq_len": 64, "share": 1.0,
                                                               "mixture": {"web": 0}}]}},
     "growlength.stages[0].mixture weights must be non-negative numbers, not all zero"),
    ({"data": {"prefix": "d/web"}, "growlength": {"stages": [{"seq_len": 64, "share": 1.0,
                                                            "mixture": {"web": 1}}]}},
     "growlength.stages[0].mixture needs data.sources"),
])
def test_bad_mixture_configs_refused_with_one_line(tree, message):
    tree["data"].setdefault("tokenizer", "tok.model")
    with pytest.raises(ConfigError) as e:
        from_dict(tree)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sources_need_the_tokenizer():
    with pytest.raises(ConfigError, match="data.sources needs data.tokenizer"):
        from_dict({"data": {"sources": "1 d/web"}})


def test_every_source_checked_against_the_one_tokenizer(tmp_path, tokenized, corpus_jsonl, sp_model):
    from data_pipeline.preprocess import preprocess
    from data_pipeline.train_tokenizer import train_bytelevel_bpe
    ok = cfg(f"0.5 {tokenized} 0.5 {tokenized}x", [{"seq_len": 64, "share": 1.0}], tokenizer=sp_model)
    with pytest.raises(DatasetError, match=r"x\.idx: file not found"):  # a missing source is named
        check_sources(ok)
    bpe = train_bytelevel_bpe([corpus_jsonl], str(tmp_path / "bpe"), vocab_size=1000, quiet=True)
    other = str(tmp_path / "books")
    preprocess([corpus_jsonl], other, bpe, quiet=True)  # same vocabulary size, another EOD
    mixed = cfg(f"0.5 {tokenized} 0.5 {other}", [{"seq_len": 64, "share": 1.0}], tokenizer=sp_model)
    with pytest.raises(DatasetError, match=r"data.tokenizer \(source books\) .* did not make .*books"):
        check_sources(mixed)
    same = cfg(f"0.5 {tokenized}", [{"seq_len": 64, "share": 1.0}], tokenizer=sp_model)
    assert check_sources(same).vocab_size == 1000
    with pytest.raises(DatasetError, match="not wired into the run yet"):  # refused, never the built-in corpus
        prepare_data(same, 0, 1)
