"""Forward+backward throughput of our CausalLM (eager and compiled) vs transformers' GPTNeoXForCausalLM, same config,
dtype and threads, interleaved; MFU against a matmul timed in the same loop. Method and results: docs/benchmarks.md.

    python benchmarks/bench_model.py                       # pythia-70m shape, vocab 8k, bf16, 2 threads
    python benchmarks/bench_model.py --dtype fp32 --lengths 128 1024 --repeats 5

After the table, the loss alone at the batch's shape: our chunked fp32 cross-entropy (model.model.cross_entropy_fp32)
against F.cross_entropy(logits.float()), forward + backward, interleaved; with their largest differences.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import CausalLM, ModelConfig  # noqa: E402
from model.hf import hf_config_dict, state_dict_to_hf  # noqa: E402
from launcher.compile import StageCompiler  # noqa: E402

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
    ours = CausalLM(ModelConfig.from_preset(args.preset, vocab_size=args.vocab, attention="sdpa"))
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
    p.add_argument("--no-compile", action="store_true", help="skip the compiled column")
    p.add_argument("--no-ce", action="store_true", help="skip the cross-entropy comparison")
    p.add_argument("--ce-device", default="cpu", help="device of the cross-entropy comparison (cpu, cuda)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    probe = MatmulProbe(dtype)
    ours, hf = build_models(args, dtype)
    models = {"ours": (ours, step_ours), "hf": (hf, step_hf)}
    compiler = None
    if not args.no_compile:
        compiled = copy.deepcopy(ours)
        compiler = StageCompiler(compiled, True, torch.device("cpu"), dtype)
        models = {"ours": (ours, step_ours), "compiled": (compiled, step_ours), "hf": (hf, step_hf)}
    print(f"{args.preset} shape, vocab {args.vocab}, {args.dtype}, {args.threads} threads, "
          f"{args.tokens_per_batch} tokens/batch, torch {torch.__version__}, {args.repeats} interleaved rounds")
    print(f"MFU = model FLOPs/s / matmul rate (2048^3 {args.dtype} matmul timed in the same interleaved loop)")
    print(f"{'seq_len':>7} {'batch':>5} | {'eager tok/s':>11} {'compiled':>9} {'HF tok/s':>9} | {'eager/HF':>8} "
          f"{'comp/HF':>8} {'comp/eager':>10} | {'compile s':>9} | {'MFU eager':>9} {'comp':>5} {'HF':>5} | "
          f"{'matmul GF/s':>11} | {'CPU-time ratio':>14}")
    for T in args.lengths:
        B = max(1, args.tokens_per_batch // T)
        g = torch.Generator().manual_seed(T)
        window = torch.randint(0, args.vocab, (B, T + 1), generator=g)
        x, y = window[:, :-1], window[:, 1:]
        compile_s = compiler.compile_stage(T, B, T) if compiler else None  # the graph for this length, timed
        times = {name: [] for name in models}
        cpu = {name: [] for name in models}  # process CPU seconds: less sensitive to other jobs on a shared machine
        rates = []
        for rep in range(args.repeats + 1):
            rates.append(probe())
            for name, (model, step) in models.items():
                model.zero_grad(set_to_none=True)
                t0, c0 = time.perf_counter(), time.process_time()
                step(model, x, y)
                if rep:  # rep 0 is the warm-up
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        if compiler and compiler.recompiles:
            print(f"  warning: {compiler.recompiles} recompile(s) at seq_len {T} after the warm-up")
        tps = {k: B * T / statistics.median(v) for k, v in times.items()}
        fpt, peak = ours.flops_per_token(T), statistics.median(rates)
        best = "compiled" if compiler else "ours"
        comp = tps.get("compiled")
        print(f"{T:>7} {B:>5} | {tps['ours']:>11,.0f} {fmt(comp, '>9,.0f')} {tps['hf']:>9,.0f} | "
              f"{tps['ours'] / tps['hf']:>7.2f}x {fmt(comp and comp / tps['hf'], '>7.2f', 'x')} "
              f"{fmt(comp and comp / tps['ours'], '>9.2f', 'x')} | {fmt(compile_s, '>9.1f')} | "
              f"{fpt * tps['ours'] / peak:>9.0%} {fmt(comp and fpt * comp / peak, '>5.0%')} "
              f"{fpt * tps['hf'] / peak:>5.0%} | {peak / 1e9:>11.0f} | "
              f"{statistics.median(cpu['hf']) / statistics.median(cpu[best]):>13.2f}x", flush=True)
    if not args.no_ce:
        print_cross_entropy(args.tokens_per_batch, ours.config.padded_vocab_size, args.dtype, args.repeats,
                            torch.device(args.ce_device))


def compare_cross_entropy(tokens: int, vocab: int, dtype: torch.dtype, repeats: int,
                          device: torch.device = torch.device("cpu")) -> dict:
    """Forward + backward of the loss on (tokens, vocab) logits in `dtype`: ours (chunked, fp32 math) vs
    F.cross_entropy(logits.float()), interleaved. Returns median seconds, CUDA peak bytes above the logits (None off
    CUDA) and the largest |loss| and |grad| differences."""
    from model.model import cross_entropy_fp32

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(tokens, vocab, generator=g)).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    ways = {"ours": lambda z: cross_entropy_fp32(z, labels),
            "torch": lambda z: torch.nn.functional.cross_entropy(z.float(), labels)}
    times, peaks, results = {k: [] for k in ways}, {}, {}
    for rep in range(repeats + 1):
        for name, loss_of in ways.items():
            logits.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            t0 = time.perf_counter()
            loss = loss_of(logits)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peaks[name] = torch.cuda.max_memory_allocated(device) - base
            if rep:
                times[name].append(time.perf_counter() - t0)
            results[name] = (loss.detach(), logits.grad.detach().float())
    (l1, g1), (l2, g2) = results["ours"], results["torch"]
    return {"ours_s": statistics.median(times["ours"]), "torch_s": statistics.median(times["torch"]),
            "ours_peak": peaks.get("ours"), "torch_peak": peaks.get("torch"),
            "loss_diff": (l1 - l2).abs().item(), "grad_diff": (g1 - g2).abs().max().item()}


def print_cross_entropy(tokens: int, vocab: int, dtype_name: str, repeats: int,
                        device: torch.device = torch.device("cpu")) -> None:
    r = compare_cross_entropy(tokens, vocab, DTYPES[dtype_name], repeats, device)
    peak = "" if r["ours_peak"] is None else \
        f" | peak MB ours {r['ours_peak'] / 2**20:,.0f} torch {r['torch_peak'] / 2**20:,.0f}"
    print(f"cross-entropy at ({tokens}, {vocab}) {dtype_name} on {device}, forward+backward: ours {r['ours_s'] * 1e3:.1f} ms, "
          f"F.cross_entropy(logits.float()) {r['torch_s'] * 1e3:.1f} ms ({r['torch_s'] / r['ours_s']:.2f}x){peak} | "
          f"max |loss diff| {r['loss_diff']:.1e}, max |grad diff| {r['grad_diff']:.1e}")


def fmt(value, spec: str, suffix: str = "") -> str:
    """A table cell; "-" where the column was not measured."""
    width = int("".join(ch for ch in spec.split(".")[0].split(",")[0] if ch.isdigit()) or 0) + len(suffix)
    return f"{'-':>{width}}" if value is None else f"{value:{spec}}{suffix}"


if __name__ == "__main__":
    main()
