"""The PyTorch peer of bench/train_throughput.py: `transformers`' DeepSeek-V4, one training step.

    python3 bench/peer_hf.py --config configs/bench-flash-8l.yaml --batch 4 --seq 4096 --steps 5
    python3 bench/peer_hf.py --config configs/bench-flash-8l.yaml --batch 2 --accum 8 --seq 4096 --steps 2

``DeepseekV4ForCausalLM`` built from the same YAML config (``ModelConfig.to_hf_dict``), in PyTorch
eager on the GPU: bf16 weights, the model's own shifted cross-entropy (``labels=``), backward and
``torch.optim.AdamW`` (fused); with ``--accum k`` an update is k micro-batches of ``--batch`` rows,
each loss divided by k and backpropagated, then one optimizer step. Synthetic tokens (uniform over the vocabulary, as
bench/train_throughput.py). Timing: median of ``--steps`` steps after 2 untimed ones, each closed
by ``torch.cuda.synchronize``. MFU uses the same FLOP count as v4jax (``flops_per_token``).
Run it in its own process, before or after JAX (JAX's preallocated pool would leave it nothing).
Prints one JSON line; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--batch", type=int, default=8, help="rows per micro-batch")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer update")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from v4jax.config import model_config_from_yaml
    from v4jax.trainer import flops_per_token

    config = model_config_from_yaml(args.config)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the device: seconds, not minutes of CPU
        model = DeepseekV4ForCausalLM(DeepseekV4Config(**config.to_hf_dict())).to(torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (args.batch, args.seq))
    ids = torch.as_tensor(tokens, device="cuda")

    def step():
        for _ in range(args.accum):
            loss = model(input_ids=ids, labels=ids).loss
            (loss / args.accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    losses, times = [], []
    for i in range(args.steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(float(step().detach()))
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    tps = args.accum * args.batch * args.seq / med
    out = {"what": "peer transformers", "transformers": transformers.__version__, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(), "config": args.config, "batch": args.batch, "accum": args.accum,
           "seq": args.seq,
           "step_s": med, "step_s_spread": float(max(times) - min(times)), "tokens_per_s": tps,
           "mfu": flops_per_token(config, args.seq) * tps / 989e12, "first_loss": losses[0], "loss": losses[-1],
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps(out), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
