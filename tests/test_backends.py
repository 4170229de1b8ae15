"""Which kernel each op takes on each accelerator (``v4jax.devices``), with the accelerator forced.

Only CPUs are here, so ``devices.current`` is replaced by a stand-in for each GPU generation (and a
TPU, an AMD GPU, the CPU). For each, the table below says by hand what must be chosen: the MoE
backend ``auto`` resolves to (with tokamax installed or not), the kernel of each product of the
``tokamax`` backend, whether the Sinkhorn kernel runs, and the weight-gradient tile size. Then the
chosen paths run here (Pallas interpreted) and must equal XLA's reference path: the grouped matmul
and its gradients, the Sinkhorn projection, the opt-in attention kernel's fallback, and a tiny
model's loss and gradients on a forced L4.
"""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import CONFIGS, rel
from v4jax import attention_kernel, devices, mhc, moe, sinkhorn_kernel
from v4jax.cli.environment import describe
from v4jax.devices import Accelerator
from v4jax.grouped_matmul_kernel import group_outer
from v4jax.quant import BlockScaled, block_scaled

H100 = Accelerator("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
A100 = Accelerator("gpu", "NVIDIA A100-SXM4-40GB", (8, 0))
L4 = Accelerator("gpu", "NVIDIA L4", (8, 9))
T4 = Accelerator("gpu", "Tesla T4", (7, 5))
# name: (accelerator, auto with tokamax installed, the tokamax backend's kernels, the Sinkhorn kernel,
#        the weight-gradient kernel's large tiles: True / False, None where that kernel does not run)
ACCELERATORS = {
    "H100": (H100, "tokamax", ("mosaic", "mosaic", "pallas"), True, True),
    "B200": (Accelerator("gpu", "NVIDIA B200", (10, 0)), "tokamax", ("mosaic", "mosaic", "pallas"), True, True),
    "A100": (A100, "ragged_dot", ("xla", "xla", "pallas"), True, True),
    "L4": (L4, "ragged_dot", ("xla", "xla", "pallas"), True, False),
    "RTX 5090": (Accelerator("gpu", "NVIDIA GeForce RTX 5090", (12, 0)), "ragged_dot", ("xla", "xla", "pallas"),
                 True, False),
    "T4": (T4, "ragged_dot", ("xla", "xla", "xla"), False, None),
    "MI300X": (Accelerator("gpu", "AMD Instinct MI300X", None), "ragged_dot", ("xla", "xla", "xla"), False, None),
    "TPU v5e": (Accelerator("tpu", "TPU v5 lite"), "tokamax", ("mosaic", "mosaic", "xla"), False, None),
    "CPU": (Accelerator("cpu", "cpu"), "ragged_dot", ("xla", "xla", "xla"), False, None),
}


@pytest.fixture
def force(monkeypatch):
    """force(acc, tokamax=False): v4jax sees ``acc`` (and tokamax installed or not) from now on."""

    def set_accelerator(acc, tokamax=False):
        monkeypatch.setattr(devices, "current", lambda: acc)
        monkeypatch.setattr(moe, "tokamax_installed", lambda: tokamax)

    return set_accelerator


@pytest.mark.parametrize("name", list(ACCELERATORS))
def test_each_accelerator_gets_the_paths_it_can_run(name, force):
    acc, auto, kernels, sinkhorn, large_tiles = ACCELERATORS[name]
    force(acc, tokamax=True)
    assert moe.resolve_backend("auto") == auto
    assert moe.tokamax_kernels() == kernels
    assert mhc.sinkhorn_kernel_runs(4, acc) is sinkhorn
    if large_tiles is not None:  # the weight-gradient kernel runs: its tiles fit the shared memory
        tiles = group_outer_tiles(acc)
        assert tiles == ((128, 256) if large_tiles else (64, 128))
    line = describe()
    assert f"backend {acc.platform}: {jax.device_count()} x {acc.kind}" in line
    assert f"MoE grouped matmul: {auto}" in line and f"mHC Sinkhorn: {'pallas' if sinkhorn else 'xla'}" in line
    force(acc, tokamax=False)
    assert moe.resolve_backend("auto") == "ragged_dot"
    assert moe.resolve_backend("padded") == "padded"


def group_outer_tiles(acc):
    """The (rows, columns) output tile of the weight-gradient kernel for [g, 512, 512] outputs on
    ``acc``, read off the grid of the Pallas call (g, 512 / tile rows, 512 / tile columns)."""
    a = jax.ShapeDtypeStruct((64, 512), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((2,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda *args: group_outer(*args))(a, a, sizes)  # a new function: no cached trace
    eqn = next(e for e in jaxpr.eqns if e.primitive.name == "pallas_call")
    _, i, j = eqn.params["grid_mapping"].grid
    return 512 // i, 512 // j


def test_describe_names_the_device_and_its_kernels(force):
    force(H100, tokamax=True)
    line = describe()
    assert line.startswith(f"jax {jax.__version__}, backend gpu: ")
    assert "x NVIDIA H100 80GB HBM3 (sm90); MoE grouped matmul: tokamax (forward mosaic, input gradient mosaic, " \
           "weight gradient pallas); mHC Sinkhorn: pallas; attention: xla" in line
    from v4jax.parallel import ParallelConfig

    force(T4)
    line = describe(ParallelConfig(moe_backend="padded", attention_kernel="pallas"))
    assert "Tesla T4 (sm75); MoE grouped matmul: padded; mHC Sinkhorn: xla; attention: xla (the pallas" in line


@pytest.mark.parametrize("name", ["A100", "L4", "T4"])
def test_the_chosen_grouped_matmul_equals_ragged_dot(name, force):
    """The tokamax backend's products where tokamax has no kernel (XLA's, and the Pallas weight
    gradient with that GPU's tiles where Triton runs; interpreted): values and both gradients equal
    autodiff of jax.lax.ragged_dot. fp32, relative 1e-5; an empty group, rows past the groups' total."""
    acc, _, kernels, *_ = ACCELERATORS[name]
    force(acc, tokamax=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(70, 128)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 256, 128)), jnp.float32)  # [g, n, k], stored [out, in]
    sizes = jnp.array([30, 0, 33], jnp.int32)
    dy = jnp.asarray(rng.normal(size=(70, 256)), jnp.float32) * (jnp.arange(70) < 63)[:, None]
    ref, ref_vjp = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, jnp.swapaxes(b, 1, 2), sizes), x, w)
    got, got_vjp = jax.vjp(lambda a, b: moe.grouped_matmul(a, b, sizes, "tokamax"), x, w)
    assert moe.tokamax_kernels() == kernels and rel(got, ref) <= 1e-5
    for g, r in zip(got_vjp(dy), ref_vjp(dy)):
        assert rel(g, r) <= 1e-5


@pytest.mark.parametrize("name,fused", [("A100", True), ("T4", False)])
def test_sinkhorn_takes_the_kernel_only_where_triton_runs(name, fused, force, monkeypatch):
    force(ACCELERATORS[name][0])
    calls = []
    kernel = sinkhorn_kernel.fused_sinkhorn
    monkeypatch.setattr(sinkhorn_kernel, "fused_sinkhorn", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    logits = jnp.asarray(np.random.default_rng(1).normal(0, 3, size=(5, 4, 4)), jnp.float32)
    got = mhc.sinkhorn(logits, 20, 1e-6)
    assert len(calls) == fused
    assert rel(got, mhc.sinkhorn_loop(logits, 20, 1e-6)) <= 1e-5


@pytest.mark.parametrize("acc", [T4, Accelerator("tpu", "TPU v5 lite")], ids=["T4", "TPU"])
def test_attention_kernel_falls_back_to_xla_where_it_cannot_run(acc, force, monkeypatch):
    """On a GPU without Pallas Triton or a TPU the opt-in kernel warns and gives the XLA path's
    result; the kernel itself is never entered."""
    force(acc)
    monkeypatch.setattr(attention_kernel, "_attend", lambda *a: pytest.fail("the kernel ran"))
    rng = np.random.default_rng(2)
    b, s, h, c = 1, 12, 2, 16
    q, kv = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((b, s, h, c), (b, s, c)))
    sink = jnp.asarray(rng.normal(size=(h,)), jnp.float32)
    seg, pos = jnp.ones((b, s), jnp.int32), jnp.arange(s, dtype=jnp.int32)[None]
    with pytest.warns(UserWarning, match="compute capability >= 8.0"):
        got, _ = attention_kernel.pallas_sparse_attention(q, kv, sink, seg, pos, 4)
    want, _ = attention_kernel.sparse_attention(q, kv, sink, seg, pos, 4)
    assert rel(got, want) == 0
    force(H100)  # where it runs, it runs
    with pytest.raises(pytest.fail.Exception, match="the kernel ran"), warnings.catch_warnings():
        warnings.simplefilter("error")
        attention_kernel.pallas_sparse_attention(q, kv, sink, seg, pos, 4)


def test_a_training_gradient_on_a_forced_l4_equals_the_cpu_path(force, monkeypatch):
    """A tiny model's loss and gradients with what an L4 takes (the tokamax backend asked for: XLA's
    products with ragged rows, the Pallas weight gradient with small tiles, the Pallas Sinkhorn;
    interpreted) equal the CPU's reference path. fp32: the loss to 1e-5; each gradient to 1e-3 of
    its largest entry (the head's mHC gradients cancel to 3e-4 of their size in either path)."""
    from v4jax.model import forward, init_params
    from v4jax.parallel import ParallelConfig

    config = CONFIGS["c"].replace(num_hidden_layers=1, layer_types=("swa",))
    params = init_params(config, seed=0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, config.vocab_size)
    weights = jax.random.normal(jax.random.PRNGKey(2), (2, 24, config.vocab_size))
    par = ParallelConfig(moe_backend="tokamax")
    kernels = []
    for module, name in ((sinkhorn_kernel, "fused_sinkhorn"), (moe, "group_outer")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn, name=name, **k: kernels.append(name) or fn(*a, **k))

    def loss_and_grads():
        loss = lambda p: jnp.sum(forward(p, tokens, config, parallel=par)["logits"] * weights)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)  # a new function each time: traced anew

    force(Accelerator("cpu", "cpu"), tokamax=True)
    want = loss_and_grads()
    assert not kernels
    force(L4, tokamax=True)
    got = loss_and_grads()
    assert set(kernels) == {"fused_sinkhorn", "group_outer"}
    assert rel(got[0], want[0]) <= 1e-5
    for g, r in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert rel(g, r) <= 1e-3


def test_gpu_and_tpu_requirements_pin_the_jax_of_requirements_txt():
    """requirements-gpu.txt and requirements-tpu.txt pin jax with its CUDA / TPU extra at the release
    requirements.txt pins, for each Python line; pip would refuse two pins, but only at install."""
    root = Path(__file__).parent.parent

    def jax_pins(name):  # {Python marker: (requirement name, version)} of the jax lines
        lines = [line.split(";") for line in (root / name).read_text().splitlines() if line.startswith("jax")]
        return {marker.strip(): tuple(pin.split("==")) for pin, marker in lines if not pin.startswith("jaxlib")}

    cpu = jax_pins("requirements.txt")
    assert cpu == {'python_version < "3.12"': ("jax", "0.10.2"), 'python_version >= "3.12"': ("jax", "0.11.2")}
    for name, extra in (("requirements-gpu.txt", "jax[cuda12]"), ("requirements-tpu.txt", "jax[tpu]")):
        assert jax_pins(name) == {marker: (extra, version) for marker, (_, version) in cpu.items()}


def test_tokamax_is_imported_with_the_moe_module(tmp_path):
    """Where tokamax is installed, ``import v4jax.moe`` imports it, before anything is jitted: its
    config options are jax user contexts, part of every jit cache key, so an import at the first
    traced MoE made everything jitted earlier compile a second time (an 8K prefill on an H100
    compiled again on its second call, 30 s). First the jax behaviour that makes it matter, then
    the import, with a stand-in tokamax package that only creates a user context."""
    f = jax.jit(lambda x: x + 1)
    f(jnp.ones(3))
    before = f._cache_size()
    jax.make_user_context(None)  # what importing tokamax does, once per option
    f(jnp.ones(3))
    assert f._cache_size() == before + 1  # the same call compiled again

    fake = tmp_path / "tokamax"
    fake.mkdir()
    (fake / "__init__.py").write_text("import jax\nOPTION = jax.make_user_context(None)\n")
    code = ("import sys; import v4jax.moe as m; "
            "print('tokamax' in sys.modules, m.tokamax_installed(), m._TOKAMAX.__name__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()]), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "True", "tokamax"], out.stderr[-2000:]


def test_expert_ffn_concatenates_w1_and_w3_only_for_training():
    """bf16 weights with bf16 compute (a bf16 model decoding) and weights kept FP4 as stored run w1
    and w3 as two grouped matmuls, fp32 master weights (training) as one on their concatenation,
    cast on the way: the same products, so the same output (bf16 rounding of the same sums: 1e-2
    relative)."""
    rng = np.random.default_rng(0)
    e, f, d, m = 4, 16, 32, 24
    p32 = {k: jnp.asarray(rng.normal(size=s) * 0.2, jnp.float32)
           for k, s in (("w1", (e, f, d)), ("w3", (e, f, d)), ("w2", (e, d, f)))}
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p32)
    xs = jnp.asarray(rng.normal(size=(m, d)), jnp.bfloat16)
    sizes, w = jnp.asarray([5, 0, 12, 7], jnp.int32), jnp.asarray(rng.uniform(size=m), jnp.float32)
    def lowered(p):
        return jax.jit(lambda p: moe.expert_ffn(xs, sizes, w, p, 10.0, "ragged_dot")[0]).lower(p).as_text()

    kept = jax.tree.map(lambda a: block_scaled(a, "fp4"), p32)
    w13 = "tensor<4x32x32xbf16>"  # [e, 2f, d]: w1 and w3 concatenated
    assert w13 not in lowered(p16) and w13 not in lowered(kept) and w13 in lowered(p32)
    want = moe.expert_ffn(xs, sizes, w, p32, 10.0, "ragged_dot")[0]
    got = moe.expert_ffn(xs, sizes, w, p16, 10.0, "ragged_dot")[0]
    assert rel(got.astype(jnp.float32), want.astype(jnp.float32)) <= 1e-2
    decoded = jax.tree.map(lambda b: b.values(jnp.float32), kept, is_leaf=lambda x: isinstance(x, BlockScaled))
    got = moe.expert_ffn(xs, sizes, w, kept, 10.0, "ragged_dot")[0]
    want = moe.expert_ffn(xs, sizes, w, decoded, 10.0, "ragged_dot")[0]
    assert rel(got.astype(jnp.float32), want.astype(jnp.float32)) <= 1e-2
