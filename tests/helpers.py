"""What the tests share: the tiny random configs, the error measure, batches, a checkpoint writer.

The configs together cover SWA, CSA and HCA layers, hash layers, hc_mult 2 and 4, YaRN on
compressed layers (and its absence), compression ratios other than the release's, sequences longer
than the window that cross several compression blocks, and index_topk smaller than the number of
visible entries. The references the tests compare against live beside this module:
``hf_oracle`` (transformers' DeepSeek-V4 in PyTorch) and ``dense_reference`` (the dense attention).
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from v4jax.config import ModelConfig
from v4jax.convert.names import official_name, tree_paths
from v4jax.model import init_params

BASE = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, head_dim=16, qk_rope_head_dim=8,
            q_lora_rank=16, o_groups=2, o_lora_rank=8, index_n_heads=16, index_head_dim=16,
            n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, hc_sinkhorn_iters=20)

CONFIGS = {
    # hc 4, all three kinds, the release's YaRN, two hash layers, a SwiGLU clamp that actually clips
    "a": ModelConfig.from_dict(dict(**BASE, num_hidden_layers=4, layer_types=("swa", "csa", "hca", "csa"),
                     compress_rates={"csa": 4, "hca": 8}, sliding_window=8, index_topk=3, num_hash_layers=2,
                     hc_mult=4, swiglu_limit=0.5,
                     rope_scaling={"factor": 16.0, "original_max_position_embeddings": 65536})),
    # hc 2, HCA first (as in Pro), other ratios, a stronger YaRN
    "b": ModelConfig.from_dict(dict(**BASE, num_hidden_layers=2, layer_types=("hca", "csa"), compress_rates={"csa": 2, "hca": 4},
                     sliding_window=4, index_topk=2, num_hash_layers=1, hc_mult=2,
                     rope_scaling={"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8,
                                   "beta_slow": 1})),
    # hc 4, no YaRN, no hash layers, release ratio 4 with a larger window and top-k
    "c": ModelConfig.from_dict(dict(**BASE, num_hidden_layers=3, layer_types=("csa", "swa", "hca"),
                     compress_rates={"csa": 4, "hca": 16}, sliding_window=16, index_topk=5, num_hash_layers=0,
                     hc_mult=4, rope_scaling=None, rope_theta=500.0, compress_rope_theta=2000.0)),
}
SEQ = {"a": 40, "b": 23, "c": 53}


def rel(got, want) -> float:
    """max |got - want| / max |want|, in float64: the error every tolerance in the tests bounds."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def flat(tree) -> dict:
    """{jax key string: leaf} of a tree."""
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# chi-square critical values at p = 1e-6 for dof = 1..7 (scipy.stats.chi2.isf(1e-6, dof))
CHI2_1E6 = {1: 23.93, 2: 27.63, 3: 30.66, 4: 33.38, 5: 35.89, 6: 38.26, 7: 40.52}


def np_filtered(z, t, top_k, top_p):
    """The distribution ``v4jax.sampling`` draws from, in float64 numpy written from its docstring:
    softmax(z/t), keep the top-k, renormalise, keep the smallest prefix (by decreasing probability)
    with mass >= top_p, renormalise."""
    p = np.exp(z / t - (z / t).max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[: top_k or len(z)]] = True
    q = np.where(keep, p, 0.0) / p[keep].sum()
    cum = np.cumsum(q[order])
    n = int(np.searchsorted(cum, top_p) + 1) if top_p < 1 else len(z)
    keep2 = np.zeros(len(z), bool)
    keep2[order[: min(n, keep.sum())]] = True
    r = np.where(keep2, q, 0.0)
    return r / r.sum()


def sharpened(params):
    """Matrices scaled up 8x from the default init, so that softmaxes, indexer picks and clamps are far
    from their uniform / inactive regime and every path is exercised."""
    return jax.tree.map(lambda a: a * 8 if a.dtype == jnp.float32 and a.ndim >= 2 else a, params)


def batch(config, b, s, seed=0):
    """A training batch of random tokens, one document per row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, size=(b, s)).astype(np.int32)
    pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    return {"tokens": tokens, "positions": pos, "segment_ids": np.ones((b, s), np.int32),
            "targets": np.roll(tokens, -1, 1), "loss_mask": np.ones((b, s), np.float32),
            "mtp_targets": np.roll(tokens, -2, 1), "mtp_mask": np.ones((b, s), np.float32)}


def write_checkpoint(directory, config, edit=None):
    """A release-layout checkpoint of a random model, written here (independent of our converter)."""
    tensors = {}
    for path, leaf in tree_paths(init_params(config, seed=0)):
        leaf = np.asarray(leaf)
        if "experts" in path:
            for e in range(leaf.shape[0]):
                tensors[official_name(path, e)] = leaf[e]
        else:
            tensors[official_name(path)] = leaf
    if edit:
        edit(tensors)
    directory.mkdir(exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config.to_release_dict()))
    return directory


def save_run(workdir, overrides=(), config="configs/tiny.yaml", seed=0):
    """A train.py run directory with one checkpoint (step 1) of an initialised state, as train.py
    lays it out, without training: for the tools that read runs."""
    from v4jax.checkpoint import Checkpointer
    from v4jax.trainer import init_state, load_run_config, make_optimizer

    run = load_run_config(config, list(overrides))
    params = init_params(run.model, seed, scan=run.parallel.scan_layers)
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(1, init_state(params, make_optimizer(run.train, run.model)), {}, run.to_dict(), force=True)
    ckpt.close()
    (workdir / "config.json").write_text(json.dumps(run.to_dict()))
    return workdir


_ROOT = Path(__file__).resolve().parents[1]


def launch(argv: list[str], timeout: float, process_0: tuple[str, ...] = (), processes: int = 2,
           devices_each: int = 4) -> list[str]:
    """Run ``argv`` as the processes of one jax.distributed job (process 0 with ``process_0`` added);
    each one's output (stdout + stderr). Fails the test unless every process exits 0 within
    ``timeout`` seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}", PYTHONPATH=str(_ROOT))
    procs = [subprocess.Popen([sys.executable, *argv, *(process_0 if i == 0 else ())], cwd=_ROOT, text=True,
                              env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
             for i in range(processes)]
    outs = [""] * processes
    try:
        for i, p in enumerate(procs):  # one deadline for the job: a hung process fails it, not the suite
            outs[i] = p.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    codes = [p.wait() for p in procs]
    assert codes == [0] * processes, "\n".join(f"--- process {i}, exit {c}:\n{o[-3000:]}"
                                               for i, (c, o) in enumerate(zip(codes, outs)))
    return outs
