"""model.z_loss in a real one-rank run: the step record's ``loss`` stays the cross-entropy (step 1, before any
update, equals a run without the penalty) and ``z_loss`` is logged apart."""
import json

import pytest

from launching import ZERO2
from runner import steps


@pytest.fixture
def fp32(tmp_path):
    cfg = json.loads(ZERO2.read_text())
    cfg["bf16"] = {"enabled": False}
    path = tmp_path / "zero2_fp32.json"
    path.write_text(json.dumps(cfg))
    return path


def test_z_loss_is_logged_apart_from_the_loss(run, fp32, tmp_path):
    code, out = run("model.z_loss=0.01", ds_config=fp32)
    assert code == 0, out[-3000:]
    code, out = run(ds_config=fp32, run_dir=tmp_path / "plain")
    assert code == 0, out[-3000:]
    with_z, plain = steps(run.run_dir), steps(tmp_path / "plain")
    assert with_z[1]["loss"] == pytest.approx(plain[1]["loss"], rel=1e-6)
    assert "z_loss" not in plain[1]
    # log(vocab) ~ 7 at init: the penalty is about 0.01 * 7^2
    assert 0.2 < with_z[1]["z_loss"] < 1.0
