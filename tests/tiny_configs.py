"""Tiny random configs for parity tests. Together they cover SWA, CSA and HCA layers, hash layers,
hc_mult 2 and 4, YaRN on compressed layers (and its absence), compression ratios other than the
release's, sequences longer than the window that cross several compression blocks, and index_topk
smaller than the number of visible entries."""

from v4jax.config import ModelConfig

BASE = dict(vocab_size=97, hidden_size=32, num_attention_heads=4, head_dim=16, qk_rope_head_dim=8,
            q_lora_rank=16, o_groups=2, o_lora_rank=8, index_n_heads=16, index_head_dim=16,
            n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, hc_sinkhorn_iters=20)

CONFIGS = {
    # hc 4, all three kinds, YaRN, two hash layers, a SwiGLU clamp that actually clips
    "a": ModelConfig.from_dict(dict(**BASE, num_hidden_layers=4, layer_types=("swa", "csa", "hca", "csa"),
                     compress_rates={"csa": 4, "hca": 8}, sliding_window=8, index_topk=3, num_hash_layers=2,
                     hc_mult=4, swiglu_limit=0.5)),
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
