"""Post-training on the trainer (v4jax.post_training, v4jax.tasks): GRPO and on-policy distillation.

* The objectives inside the trainer's loss against numpy written from the published formulas on the
  model's own logits (1e-5 relative, fp32), with gradient accumulation equal to the whole batch,
  and one sharded step on fake devices equal to one device's.
* A rollout batch: completion tokens counted, the old policy's log-probabilities from the decode
  loop equal to the training forward's at the same positions (1e-4), the advantages of the rewards
  a ``module:function`` reward gave, normalised within each prompt's samples.
* train.py end to end: supervised steps, GRPO steps, evaluation, resume equal to the uninterrupted
  run; distillation toward that run; refusals before anything is written.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from tests.helpers import CONFIGS, rel
from tests.test_accumulation import compare_update
from v4jax.config import ConfigError
from v4jax.model import forward, init_params
from v4jax.parallel import ParallelConfig, batch_sharding, make_mesh
from v4jax.post_training import (
    PostConfig,
    Rollouts,
    distill_objective,
    grpo_objective,
    rows_batch,
    target_log_probs,
)
from v4jax.schema import param_shardings, shard_like_params
from v4jax.tasks import (
    Prompt,
    arithmetic_prompts,
    completion,
    exact_match,
    format_reward,
    load_reward,
    read_prompts,
    split_prompts,
)
from v4jax.tokenizer import load_tokenizer
from v4jax.trainer import TrainConfig, init_state, load_run_config, loss_fn, make_optimizer, make_train_step

CONFIG = CONFIGS["a"].replace(n_routed_experts=8)
ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


def text_length(*, completion, **_):
    """A reward for the tests, loaded as tests.test_post_training:text_length: it differs within a group."""
    return float(len(completion))


# --------------------------------------------------------------------------------------------------
# numpy references


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_seq_mean(values, mask):
    n = mask.sum(-1)
    has = n > 0
    return float(np.sum(np.where(has, (values * mask).sum(-1) / np.maximum(n, 1), 0)) / has.sum())


def np_grpo(logits, targets, old, ref, adv, mask, temperature, eps, beta):
    lp = np.take_along_axis(np_log_softmax(logits / temperature), targets[..., None], -1)[..., 0]
    ratio = np.exp(lp - old)
    surrogate = np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv)
    k3 = np.exp(ref - lp) - (ref - lp) - 1
    return -np_seq_mean(surrogate - beta * k3, mask)


def np_reverse_kl(logits, teachers, weights, mask):
    ls = np_log_softmax(logits)
    per = sum(w * np.sum(np.exp(ls) * (ls - np_log_softmax(t)), -1) for w, t in zip(weights, teachers))
    return np_seq_mean(per, mask)


def policy_batch(seed=0, b=8, s=24):
    """Rows of a prompt and a completion of random lengths (some rows padded), with old and reference
    log-probabilities off the policy's (ratios inside and outside the clip range) and advantages of 2
    prompts x 4 samples."""
    rng = np.random.default_rng(seed)
    seqs, trained = [], []
    for _ in range(b):
        head, tail = int(rng.integers(2, 8)), int(rng.integers(1, s - 8))
        seqs.append(list(rng.integers(3, CONFIG.vocab_size, head + tail)))
        trained.append([False] * head + [True] * tail)
    batch = rows_batch(seqs, trained, s, b)
    batch["old_logp"] = rng.normal(-3, 0.5, (b, s)).astype(np.float32)
    batch["ref_logp"] = rng.normal(-3, 0.5, (b, s)).astype(np.float32)
    adv = rng.normal(size=(b,)).astype(np.float32)
    batch["advantages"] = np.repeat(adv[:, None], s, 1)
    return batch


def two_teachers(batch, seed=0):
    """Two random teachers' log-probabilities for ``batch``'s rows, and the batch with their sum
    weighted 3:1 as ``teacher_logp``, as the rollouts give it."""
    rng = np.random.default_rng(seed)
    logp = [np_log_softmax(rng.normal(size=batch["tokens"].shape + (CONFIG.vocab_size,)) * 2) for _ in range(2)]
    return {**batch, "teacher_logp": (0.75 * logp[0] + 0.25 * logp[1]).astype(np.float32)}, logp


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, seed=0, scan=True)


def model_logits(params, batch):
    out = forward(params, jnp.asarray(batch["tokens"]), CONFIG, positions=jnp.asarray(batch["positions"]),
                  segment_ids=jnp.asarray(batch["segment_ids"]))
    return np.asarray(out["logits"], np.float64)


def test_rows_batch_counts_the_completion_targets_only():
    batch = rows_batch([[0, 5, 6, 7, 8]], [[False, False, True, True, True]], 8, 2)
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 1, 1, 1, 0, 0, 0, 0])  # targets 6, 7, 8
    np.testing.assert_array_equal(batch["targets"][0, 1:4], [6, 7, 8])
    assert batch["loss_mask"][1].sum() == 0 and batch["segment_ids"][1].sum() == 0  # a padding row


@pytest.mark.parametrize("method", ["grpo", "distill"])
def test_objective_in_the_trainer_loss_is_the_published_one(params, method):
    """The trainer's loss with the objective: the policy term equals numpy's on the model's logits,
    the total adds the routing terms as pre-training does; accumulating 2 or 4 micro-batches gives
    the same loss and gradients."""
    post = PostConfig(method=method, temperature=0.7, clip_eps=0.2, kl_coef=0.1, sft_steps=1,
                      **({"teachers": ["a", "b"], "teacher_weights": [3, 1], "samples_per_prompt": 1}
                         if method == "distill" else {}))
    batch, teachers = (policy_batch(), None) if method == "grpo" else two_teachers(policy_batch())
    objective = grpo_objective(post) if method == "grpo" else distill_objective(post)
    cfg = TrainConfig(steps=10)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True, allow_int=True), static_argnums=(2, 3, 5, 6, 7, 8))
    (loss, (metrics, _)), grads = grad(params, jb, CONFIG, cfg, jnp.asarray(3), None, None, None, objective)
    logits, mask = model_logits(params, batch), batch["loss_mask"].astype(np.float64)
    if method == "grpo":
        want = np_grpo(logits, batch["targets"], batch["old_logp"], batch["ref_logp"], batch["advantages"], mask,
                       0.7, 0.2, 0.1)
        clip = float(metrics["clip_fraction"])
        assert 0 < clip < 1  # both branches of the clip
    else:
        want = np_reverse_kl(logits, teachers, [0.75, 0.25], mask)
        mix = 0.75 * teachers[0] + 0.25 * teachers[1]
        agree = np.sum((logits.argmax(-1) == mix.argmax(-1)) * mask) / mask.sum()
        assert abs(float(metrics["agreement"]) - agree) < 1e-6
    assert rel(metrics["policy_loss"], want) <= TOL
    assert "mtp_loss" not in metrics and "lm_loss" not in metrics
    total = want + cfg.balance_weight * float(metrics["balance_loss"]) + float(metrics["indexer_loss"])
    assert rel(loss, total) <= TOL
    from v4jax.trainer import update_gradients

    for k in (2, 4):
        got_loss, got_grads, got_m, _ = jax.jit(update_gradients, static_argnums=(2, 3, 5, 6, 7))(
            params, jb, CONFIG, TrainConfig(steps=10, grad_accum_steps=k), jnp.asarray(3), None, None, objective)
        assert rel(got_loss, loss) <= TOL and rel(got_m["policy_loss"], metrics["policy_loss"]) <= TOL, k
        top = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads) if g.dtype != jax.dtypes.float0)
        for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(grads)):
            if w.dtype != jax.dtypes.float0:
                err = float(np.abs(np.asarray(g) - np.asarray(w)).max()) / max(float(np.abs(w).max()), 1e-3 * top)
                assert err <= 2e-4, (k, err)


def test_sharded_grpo_step_equals_one_device():
    """One GRPO update on data 2 x fsdp 2 x expert 2 (Muon spread over the mesh) against one device."""
    plain = init_params(CONFIG, seed=0, scan=True)
    post = PostConfig(kl_coef=0.1, sft_steps=1)
    batch = policy_batch(seed=1)
    cfg = TrainConfig(steps=10, warmup_steps=0)

    def one_step(params, parallel=None, mesh=None):
        opt = make_optimizer(cfg, CONFIG, mesh)
        state = init_state(jax.tree.map(jnp.copy, params), opt)
        if mesh is not None:
            state = jax.device_put(state, shard_like_params(state, params, mesh, CONFIG))
        b = {k: jax.device_put(v, batch_sharding(mesh)) if mesh is not None else jnp.asarray(v)
             for k, v in batch.items()}
        state, m = make_train_step(CONFIG, cfg, opt, parallel, mesh, grpo_objective(post))(state, b)
        return jax.tree.map(np.asarray, state), jax.tree.map(np.asarray, m)

    want, want_m = one_step(plain)
    parallel = ParallelConfig(2, 2, 2, 1, capacity_factor=2.0)
    mesh = make_mesh(parallel)
    got, got_m = one_step(jax.device_put(plain, param_shardings(plain, mesh, CONFIG)), parallel, mesh)
    assert bool(got_m["ok"]) and rel(got_m["loss"], want_m["loss"]) <= TOL
    assert rel(got_m["grad_norm"], want_m["grad_norm"]) <= TOL
    grads = jax.grad(lambda p: loss_fn(p, {k: jnp.asarray(v) for k, v in batch.items()}, CONFIG, cfg,
                                       jnp.asarray(0), objective=grpo_objective(post))[0], allow_int=True)(plain)
    compare_update(got["params"], want["params"], jax.tree.map(np.asarray, plain), grads, 2e-3)


# --------------------------------------------------------------------------------------------------
# Rollouts

TINY = ["model.num_hidden_layers=2", "model.layer_types=[swa, csa]", "model.hidden_size=32",
        "model.n_routed_experts=4", "model.num_hash_layers=0", "post.prompts_per_step=2",
        "post.samples_per_prompt=4", "data.batch_size=8", "post.max_new_tokens=4", "post.eval_prompts=6",
        "train.log_every=1", "train.checkpoint_every=2", "train.eval_every=2"]


def tiny_run(*overrides):
    return load_run_config(ROOT / "configs" / "tiny-grpo.yaml", [*TINY, *overrides])


def test_rollout_batch(tmp_path):
    """The old log-probabilities recorded while sampling are the training forward's at the tokens'
    target positions, at the sampling temperature; completions end at EOS; advantages are the
    rewards normalised within each prompt's samples; the reference saved after the supervised steps
    is the policy then."""
    run = tiny_run("post.temperature=1.3", "post.rewards={'tests.test_post_training:text_length': 1.0}",
                   "train.dtype=float32")
    rollouts = Rollouts(run, None, lambda b: {k: jnp.asarray(v) for k, v in b.items()}, tmp_path)
    params = init_params(run.model, seed=3)
    rollouts.start_policy_steps(params)
    assert (tmp_path / "reference").is_dir()
    batch, metrics = rollouts.policy_batch(params, step=7)
    got = {k: np.asarray(v) for k, v in batch.items()}
    want = np.asarray(target_log_probs(params, batch, run.model, jnp.float32, 1.3))
    mask = got["loss_mask"] > 0
    assert mask.sum() > 0 and np.abs(got["old_logp"] - want)[mask].max() <= 1e-4
    np.testing.assert_allclose(got["ref_logp"][mask], want[mask], atol=1e-4)  # the reference is this policy
    tok = load_tokenizer("bytes")
    rewards = []
    for r in range(8):
        ids = got["tokens"][r][got["segment_ids"][r] > 0]
        first = int(np.argmax(mask[r]))  # the last prompt token: its target is the first completion token
        new = list(ids[first + 1:])
        assert len(new) <= 4 and (1 not in new[:-1])  # EOS, when written, ends it
        assert mask[r].sum() == len(new)
        rewards.append(len(tok.decode(new)))
    r = np.array(rewards, np.float64).reshape(2, 4)
    adv = ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)).ravel()
    np.testing.assert_allclose(got["advantages"][:, 0], adv, rtol=1e-5, atol=1e-5)
    assert abs(metrics["reward_mean"] - r.mean()) < 1e-5 and 0 < metrics["completion_tokens"] <= 4
    assert len(set(rewards)) > 1
    again, _ = rollouts.policy_batch(params, step=7)  # a step's rollout depends on (seed, step) alone
    np.testing.assert_array_equal(np.asarray(again["tokens"]), got["tokens"])


# --------------------------------------------------------------------------------------------------
# train.py


def metrics_of(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_grpo_and_distillation_runs(tmp_path, capsys):
    """tiny-grpo.yaml, made smaller: 2 supervised steps then GRPO, evaluated every 2 steps; a run
    stopped at step 3 and resumed logs what the uninterrupted one did. Then a student distilled
    toward that run."""
    args = ["--config", str(ROOT / "configs" / "tiny-grpo.yaml"), "--no-progress", *TINY, "train.steps=4",
            "post.sft_steps=2", "post.rewards={exact_match: 1.0, format: 0.5}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main(["--workdir", str(straight), *args]) == 0
    assert "mean reward" in capsys.readouterr().err
    assert train.main(["--workdir", str(split), "--stop-after-step", "3", *args]) == 0
    assert train.main(["--workdir", str(split), *args]) == 0
    a, b = metrics_of(straight), metrics_of(split)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    keys = ("loss", "reward_mean", "kl", "policy_loss", "eval_reward")
    for x, y in zip(a, b):
        assert {k: x.get(k) for k in keys} == {k: y.get(k) for k in keys}, (x, y)
    assert "lm_loss" in a[1] and "reward_mean" not in a[1]  # step 2: supervised
    for k in ("reward_mean", "reward_exact_match", "reward_format", "kl", "ratio", "clip_fraction",
              "completion_tokens"):
        assert k in a[2], k
    assert abs(a[2]["ratio"] - 1) < 1e-3  # one update per rollout: the old policy is the policy
    assert abs(a[2]["lr"] - 1e-4) < 1e-9 and abs(a[1]["lr"] - 3e-3 / 20) < 1e-9  # post.lr after sft_steps
    assert "eval_reward_exact_match" in a[1] and "eval_reward" in a[3]
    assert (straight / "reference").is_dir()
    assert json.loads((straight / "config.json").read_text())["post"]["method"] == "grpo"

    student = tmp_path / "student"
    assert train.main(["--workdir", str(student), *args, "post.method=distill", f"post.teachers=[{straight}]",
                       "post.samples_per_prompt=1", "post.prompts_per_step=8", "train.steps=3",
                       "post.sft_steps=1"]) == 0
    m = metrics_of(student)
    assert all(k in m[2] for k in ("reverse_kl", "agreement", "policy_loss", "reward_mean"))
    assert m[2]["reverse_kl"] >= 0 and 0 <= m[2]["agreement"] <= 1 and "eval_agreement" in m[1]

    # GRPO from that run's checkpoint (post.init): the policy and the reference start as it, so the
    # first step's KL to the reference is 0 up to rounding
    assert train.main(["--workdir", str(tmp_path / "from_init"), *args, f"post.init={straight}", "post.sft_steps=0",
                       "train.steps=1"]) == 0
    m = metrics_of(tmp_path / "from_init")
    assert "reward_mean" in m[0] and abs(m[0]["kl"]) < 1e-5


@pytest.mark.parametrize("override, message", [
    (["data.batch_size=16"], "data.batch_size=16 must be post.prompts_per_step x post.samples_per_prompt = 8"),
    (["data.path=data/tiny_shakespeare.txt"], "leave data.path unset"),
    (["post.sft_steps=400"], "post.sft_steps=400 leaves no policy steps"),
    (["post.kl=1"], "unknown post field(s) ['kl']"),
    (["post.method=distill"], "post.teachers=[] is not allowed: at least one checkpoint"),
    (["post.samples_per_prompt=1", "post.prompts_per_step=8"], "post.samples_per_prompt=1 is not allowed"),
    (["post.rewards={nope: 1}"], "'nope' is neither a built-in"),
    (["post.rewards={'os:no_such': 1}"], "cannot load 'os:no_such'"),
    (["data.seq_len=8"], "does not fit data.seq_len=8"),
    (["post.sft_steps=0"], "post.init=None is not allowed: a starting checkpoint"),
    (["post.init=/no/such/run", "post.sft_steps=0"], "post.init='/no/such/run'"),
    (["post.teachers=[/no/such/teacher]", "post.method=distill"], "cannot load /no/such/teacher"),
    (["post.prompts=prompts.txt"], "must be one of ('arithmetic',) or a .jsonl"),
    (["post.temperature=0"], "post.temperature=0 is not allowed"),
    (["model.engram={layers: [1], tokenizer: bytes}"], "model.engram is set, and post-training samples"),
])
def test_bad_post_training_settings_are_refused_before_anything_is_written(tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    code = train.main(["--workdir", str(workdir), "--config", str(ROOT / "configs" / "tiny-grpo.yaml"),
                       "--no-progress", *TINY, *override])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def test_a_teacher_with_engram_is_refused_before_anything_is_written(tmp_path, capsys):
    import v4jax
    from v4jax.config import model_config_from_yaml

    teacher = v4jax.Model.init(model_config_from_yaml(ROOT / "configs" / "tiny-engram.yaml")).save(tmp_path / "t")
    workdir = tmp_path / "run"
    code = train.main(["--workdir", str(workdir), "--config", str(ROOT / "configs" / "tiny-grpo.yaml"), "--no-progress",
                       *TINY, "post.method=distill", f"post.teachers=[{teacher}]", "post.rewards={}"])
    err = capsys.readouterr().err
    assert code == 2 and f"post.teachers: {teacher} has Engram" in err, err
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# Prompts and rewards


def test_arithmetic_task_and_its_split():
    prompts = arithmetic_prompts()
    assert len(prompts) == 10_000 and prompts[1234] == Prompt("12+34=", "46")
    train_set, held = split_prompts(prompts, 0.05)
    assert not {p.text for p in train_set} & {p.text for p in held}
    assert 400 < len(held) < 600 and len(train_set) + len(held) == 10_000
    # the split of a prompt depends on its text only
    assert split_prompts(prompts[::-1], 0.05)[1] == held[::-1]


def test_read_prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "2+2=", "answer": "4"}\n\n{"prompt": "hi"}\n')
    assert read_prompts(f) == [Prompt("2+2=", "4"), Prompt("hi", None)]
    for text, message in (('{"prompt": 3}\n', "p.jsonl:1: each line must be an object"),
                          ('{"prompt": "a"}\nnope\n', "p.jsonl:2: not JSON"),
                          ('{"prompt": "a", "answer": 4}\n', 'p.jsonl:1: "answer" must be a string'),
                          ("\n", "no prompts")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_prompts(f)


def test_rewards_and_completions():
    tok = load_tokenizer("bytes")
    ids = [int(i) for i in tok.encode("46")]
    kept, text, finished = completion(ids + [1, 9, 9], tok, "chat")
    assert kept == ids + [1] and text == "46" and finished
    assert completion(ids, tok, "chat") == (ids, "46", False)
    assert exact_match(completion=" 46 ", answer="46") == 1 and exact_match(completion="47", answer="46") == 0
    assert format_reward(completion="46", finished=True) == 1
    assert format_reward(completion="46", finished=False) == 0 and format_reward(completion="", finished=True) == 0
    assert load_reward("tests.test_post_training:text_length")(completion="a1b22") == 5
    with pytest.raises(ValueError, match="needs an answer"):
        exact_match(completion="1", answer=None)


def test_chat_format_prompts_answers_and_completions():
    """With the DeepSeek-V4 tokenizer a prompt is a user turn with the reply's opener, a supervised
    answer is what the reply writes after it, and a reward sees the reply's content (after
    ``</think>`` in the think modes); token lists built by hand from the release's format."""
    from v4jax.chat import ASSISTANT_ID, BOS_ID, END_THINK_ID, EOS_ID, THINK_ID, USER_ID
    from v4jax.tasks import answer_tokens, prompt_tokens

    tok = load_tokenizer("deepseek")
    q, a = list(tok.encode("2+2=")), list(tok.encode("4"))
    assert prompt_tokens("2+2=", tok, "chat") == [BOS_ID, USER_ID, *q, ASSISTANT_ID, END_THINK_ID]
    assert prompt_tokens("2+2=", tok, "think") == [BOS_ID, USER_ID, *q, ASSISTANT_ID, THINK_ID]
    assert answer_tokens("4", tok, "chat") == [*a, EOS_ID]
    assert answer_tokens("4", tok, "think") == [END_THINK_ID, *a, EOS_ID]
    reasoning = list(tok.encode("two and two"))
    assert completion([*reasoning, END_THINK_ID, *a, EOS_ID, 7], tok, "think") == (
        [*reasoning, END_THINK_ID, *a, EOS_ID], "4", True)
    assert completion([*a, EOS_ID], tok, "chat")[1:] == ("4", True)
