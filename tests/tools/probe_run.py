"""``python probe_run.py OUT.json ARGS...``: ``launcher.pretrain.main(ARGS)`` as one rank, recording the growth of the
process's peak RSS from just before the model is built (the same baseline as evidence.bench_lengths' CPU memory
probe) to the end of the run, into OUT.json."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evidence.bench_lengths import _peak_rss_bytes, reset_peak_rss  # noqa: E402
from launcher import modeling, pretrain  # noqa: E402

marks = {}
_build = modeling.build_model


def build_model(cfg, model_config, **kwargs):
    marks["base"] = reset_peak_rss()
    return _build(cfg, model_config, **kwargs)


modeling.build_model = build_model
code = pretrain.main(sys.argv[2:])
marks["peak"] = _peak_rss_bytes()
Path(sys.argv[1]).write_text(json.dumps(marks))
sys.exit(code)
