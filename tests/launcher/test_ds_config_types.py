"""A ds_config value of the wrong JSON type is refused at load with the key, the value and what DeepSpeed needs,
before anything is built (DeepSpeed itself fails on it with a traceback deep in its engine)."""
import json
from pathlib import Path

import pytest

from launcher.ds_config import DSConfigError, load_ds_config

BASE = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "gradient_clipping": 1.0}


@pytest.mark.parametrize("change, message", [
    ({"gradient_clipping": "abc"}, 'gradient_clipping is "abc": DeepSpeed needs a number here'),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "1e-3"}}}, 'optimizer.params.lr is "1e-3": DeepSpeed needs a number'),
    ({"fp16": {"enabled": "yes"}}, 'fp16.enabled is "yes": DeepSpeed needs true or false'),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": [1]}},
     "zero_optimization.reduce_bucket_size is [1]: DeepSpeed needs a number"),
    ({"gradient_clipping": True}, "gradient_clipping is true: DeepSpeed needs a number"),
])
def test_a_value_of_the_wrong_type_is_one_line(tmp_path, change, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**BASE, **change}))
    before = path.read_bytes()
    with pytest.raises(DSConfigError, match="^--ds_config .*ds.json: ") as e:
        load_ds_config(str(path))
    assert message in str(e.value)
    assert path.read_bytes() == before


def test_the_shipped_configs_have_the_right_types():
    shipped = sorted((Path(__file__).parents[2] / "ds_configs").glob("*.json"))
    assert shipped
    for path in shipped:
        load_ds_config(str(path))
