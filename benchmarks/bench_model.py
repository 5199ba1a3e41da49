"""Forward+backward throughput of our GPTNeoX vs transformers' GPTNeoXForCausalLM, same config/dtype/threads.

    python benchmarks/bench_model.py                       # pythia-70m shape, vocab 8k, bf16, 2 threads
    python benchmarks/bench_model.py --dtype fp32 --lengths 128 1024 --repeats 5

Per length, both models run forward + loss + backward on the same (B, T) batch with a fixed number of tokens
per batch, interleaved (ours, theirs, ours, ...) so background load hits both alike; the table shows medians. The last
column is the same ratio from process CPU time (HF CPU-s / ours CPU-s per step), a cross-check on a busy machine.
MFU = flops_per_token(T) * tokens/s / (rate of a 2048^3 matmul in the same dtype and threads, timed inside the
same interleaved loop so it sees the same background load); flops_per_token is
model.GPTNeoX.flops_per_token (PaLM convention, attention term included), the same for both models.
Not a test: it prints a table and exits.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import GPTNeoX, ModelConfig  # noqa: E402
from model.hf import hf_config_dict, state_dict_to_hf  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class MatmulProbe:
    """Times one n x n x n matmul in `dtype`; run inside the interleaved loop so it sees the same load."""

    def __init__(self, dtype: torch.dtype, n: int = 2048):
        self.a, self.b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        self.flops = 2 * n ** 3
        self.a @ self.b  # warm-up

    def __call__(self) -> float:
        """FLOP/s of one run."""
        t0 = time.perf_counter()
        self.a @ self.b
        return self.flops / (time.perf_counter() - t0)


def build_models(args, dtype):
    torch.manual_seed(0)
    ours = GPTNeoX(ModelConfig.from_preset(args.preset, vocab_size=args.vocab, attention="sdpa"))
    import transformers

    hf_cfg = transformers.GPTNeoXConfig(**hf_config_dict(ours.config))
    hf = transformers.GPTNeoXForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    sd = state_dict_to_hf(ours.state_dict())
    sd["lm_head.weight"] = sd.pop("embed_out.weight")  # transformers 5 names the head lm_head in memory
    hf.load_state_dict(sd, strict=True)
    return ours.to(dtype).train(), hf.to(dtype).train()


def step_ours(model, x, y):
    loss = model(x, labels=y)
    loss.backward()
    return loss


def step_hf(model, x, y):
    # transformers shifts labels itself, so it gets the unshifted window: same tokens, same loss target count - 1
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="pythia-70m")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens-per-batch", type=int, default=2048)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model per length (after 1 warm-up)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    probe = MatmulProbe(dtype)
    ours, hf = build_models(args, dtype)
    print(f"{args.preset} shape, vocab {args.vocab}, {args.dtype}, {args.threads} threads, "
          f"{args.tokens_per_batch} tokens/batch, torch {torch.__version__}")
    print(f"MFU = model FLOPs/s / matmul rate (2048^3 {args.dtype} matmul timed in the same interleaved loop)")
    print(f"{'seq_len':>7} {'batch':>5} | {'ours tok/s':>10} {'HF tok/s':>9} {'ratio':>6} | "
          f"{'ours GF/s':>9} {'MFU':>5} | {'HF GF/s':>8} {'MFU':>5} | {'matmul GF/s':>11} | {'CPU-time ratio':>14}")
    for T in args.lengths:
        B = max(1, args.tokens_per_batch // T)
        g = torch.Generator().manual_seed(T)
        window = torch.randint(0, args.vocab, (B, T + 1), generator=g)
        x, y = window[:, :-1], window[:, 1:]
        times = {"ours": [], "hf": []}
        cpu = {"ours": [], "hf": []}  # process CPU seconds: less sensitive to other jobs on a shared machine
        rates = []
        for rep in range(args.repeats + 1):
            rates.append(probe())
            for name, model, step in (("ours", ours, step_ours), ("hf", hf, step_hf)):
                model.zero_grad(set_to_none=True)
                t0, c0 = time.perf_counter(), time.process_time()
                step(model, x, y)
                if rep:  # rep 0 is the warm-up
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        tps = {k: B * T / statistics.median(v) for k, v in times.items()}
        fpt, peak = ours.flops_per_token(T), statistics.median(rates)
        print(f"{T:>7} {B:>5} | {tps['ours']:>10,.0f} {tps['hf']:>9,.0f} {tps['ours'] / tps['hf']:>5.2f}x | "
              f"{fpt * tps['ours'] / 1e9:>9.0f} {fpt * tps['ours'] / peak:>5.0%} | "
              f"{fpt * tps['hf'] / 1e9:>8.0f} {fpt * tps['hf'] / peak:>5.0%} | {peak / 1e9:>11.0f} | "
              f"{statistics.median(cpu['hf']) / statistics.median(cpu['ours']):>13.2f}x", flush=True)


if __name__ == "__main__":
    main()
