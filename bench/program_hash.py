"""A hash of the one-device training step's StableHLO with locations stripped: two trees that print
the same hash lower the same program. bench-flash-8l's first 2 layers, one row of SEQ tokens, bf16,
full remat, lowered on the CPU (nothing compiled or allocated).

    PYTHONPATH=TREE JAX_PLATFORMS=cpu python bench/program_hash.py SEQ [OUT.txt]
"""

import hashlib
import re
import sys

import jax

from v4jax.config import model_config_from_yaml
from v4jax.memory import BATCH_FIELDS
from v4jax.model import param_specs
from v4jax.parallel import ParallelConfig
from v4jax.trainer import TrainConfig, init_state, make_optimizer, make_train_step


def main(seq: int, out: str | None) -> None:
    config = model_config_from_yaml("configs/bench-flash-8l.yaml")
    config = config.replace(num_hidden_layers=2, layer_types=config.layer_types[:2],
                            num_hash_layers=min(config.num_hash_layers, 2))
    cfg = TrainConfig(dtype="bfloat16")
    opt = make_optimizer(cfg, config)
    state = jax.eval_shape(lambda p: init_state(p, opt), param_specs(config, scan=True))
    batch = {k: jax.ShapeDtypeStruct((1, seq), dt) for k, dt in BATCH_FIELDS.items()}
    text = make_train_step(config, cfg, opt, ParallelConfig(remat="full")).lower(state, batch).as_text(
        debug_info=False)
    text = re.sub(r"#loc\d* = .*\n", "", re.sub(r"loc\([^)]*\)", "", text))
    print(f"{len(text)} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")
    if out:
        open(out, "w").write(text)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
