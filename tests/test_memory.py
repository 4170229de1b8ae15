"""Ahead-of-time memory planning: compiles on abstract shapes and reflects the sharding."""

from tests.test_parallel import CONFIG, B, S, parallel_for
from v4jax.memory import training_memory
from v4jax.parallel import make_mesh
from v4jax.trainer import TrainConfig


def test_sharding_shrinks_per_device_memory():
    reports = {}
    for shape in ((8, 1, 1, 1), (2, 2, 2, 1)):
        par = parallel_for(shape)
        reports[shape] = training_memory(CONFIG, TrainConfig(steps=10), par, make_mesh(par), B, S)
    replicated, sharded = reports[(8, 1, 1, 1)], reports[(2, 2, 2, 1)]
    # pure data parallelism keeps the whole train state on every device
    assert replicated["argument_bytes_per_device"] >= replicated["state_bytes_total"]
    # fsdp and expert sharding split the embedding, head and experts over devices
    assert sharded["argument_bytes_per_device"] < 0.8 * replicated["argument_bytes_per_device"]
    assert sharded["temp_bytes_per_device"] > 0 and sharded["peak_estimate_bytes_per_device"] > 0
