"""Which FP8 GEMM paths XLA:GPU runs natively: bf16 dot vs fp8 dots (per-tensor and V4's blocks)."""
import json, re, sys, time
import jax, jax.numpy as jnp, numpy as np

M, K, N = 8192, 4096, 4096
F8 = jnp.float8_e4m3fn
key = jax.random.PRNGKey(0)
x = jax.random.normal(key, (M, K), jnp.bfloat16)
w = jax.random.normal(jax.random.PRNGKey(1), (N, K), jnp.bfloat16)
x8 = x.astype(F8); w8 = w.astype(F8)
sx = jnp.ones((M, K // 128), jnp.float32); sw = jnp.ones((N // 128, K // 128), jnp.float32)

def t(name, f, *args):
    fj = jax.jit(f)
    try:
        c = fj.lower(*args).compile()
    except Exception as e:
        print(name, "COMPILE FAIL", type(e).__name__, str(e)[:300]); return
    txt = c.as_text()
    calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', txt)))
    fus = len(re.findall(r"fusion", txt))
    y = fj(*args); y.block_until_ready()
    ts = []
    for _ in range(20):
        t0 = time.perf_counter(); fj(*args).block_until_ready(); ts.append(time.perf_counter() - t0)
    s = float(np.median(ts))
    print(json.dumps({"name": name, "ms": round(s * 1e3, 3), "tflops": round(2 * M * K * N / s / 1e12, 1),
                      "custom_calls": calls, "out": str(y.dtype)}))
    if "--hlo" in sys.argv:
        print(txt[:3000])

t("bf16 dot", lambda a, b: jnp.einsum("mk,nk->mn", a, b, preferred_element_type=jnp.float32), x, w)
t("fp8 dot per-tensor (f8 x f8 -> f32)", lambda a, b: jnp.einsum("mk,nk->mn", a, b, preferred_element_type=jnp.float32), x8, w8)
t("fp8 dot per-tensor scaled (XLA pattern)", lambda a, b, s1, s2: jnp.einsum("mk,nk->mn", a.astype(jnp.bfloat16) * s1, b.astype(jnp.bfloat16) * s2, preferred_element_type=jnp.float32), x8, w8, jnp.bfloat16(1.0), jnp.bfloat16(1.0))
try:
    from jax.lax import scaled_dot
    dn = (((1,), (1,)), ((), ()))
    t("lax.scaled_dot 1x128 / 128x128 (expanded)", lambda a, b, s1, s2: scaled_dot(a, b, lhs_scale=s1, rhs_scale=jnp.repeat(s2, 128, 0), dimension_numbers=dn, preferred_element_type=jnp.float32), x8, w8, sx, sw)
except Exception as e:
    print("scaled_dot unavailable", e)
try:
    t("nn.scaled_matmul mxfp8", lambda a, b: jax.nn.scaled_dot_general(a[None], b[None], (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.bfloat16), x, w)
except Exception as e:
    print("scaled_dot_general fail", str(e)[:200])
# blockwise by splitting K into 128-blocks: batched fp8 GEMMs then scaled sum
def blocks(a, b, s1, s2):
    a3 = a.reshape(M, K // 128, 128); b3 = b.reshape(N, K // 128, 128)
    p = jnp.einsum("mjk,njk->jmn", a3, b3, preferred_element_type=jnp.float32)
    return jnp.einsum("jmn,mj,nj->mn", p, s1, jnp.repeat(s2, 128, 0))
t("fp8 per-K-block batched + scaled sum", blocks, x8, w8, sx, sw)
print(jax.__version__, jax.devices()[0].device_kind)
