"""The model benchmark: forward+backward throughput of our GPTNeoX against transformers' GPTNeoXForCausalLM (same
config, weights, dtype and device), and one launcher-shaped cell: the DeepSpeed engine from a ds_config with a real
optimizer step.

    python benchmarks/bench_model.py                       # pythia-70m shape, vocab 8k, bf16, CPU, 2 threads
    python benchmarks/bench_model.py --device cuda --preset pythia-160m --vocab 50277 --lengths 2048 \
        --tokens-per-batch 16384 --no-compile --engine ds_configs/zero1.json --engine-tokens 65536 --json out.json

Per length the models run forward + loss + backward on the same (B, T) batch at a fixed number of tokens per batch,
interleaved (ours eager, ours compiled, ours flash-attn where it runs, theirs, ours eager, ...) so background load hits
all alike; the table shows medians. "compiled" is ours with the blocks under torch.compile as the launcher's
model.compile does it (launcher/compile.py, its build time in the "compile s" column); --no-compile drops it.
transformers runs with use_cache=False (no KV cache is built in training).

MFU is given both ways: PaLM's convention (model.flops_per_token: the full T x T attention term) and causal (the
(query, key) pairs a causal kernel computes, T (T + 1) / 2 per row, as the trainer's `mfu` counts them). The peak is
the GPU's dense bf16 peak (launcher.metrics, or --peak-tflops) on CUDA, and on the CPU the rate of a 2048^3 matmul in
the same dtype timed inside the interleaved loop.

After the table, the loss alone at the batch's shape: our chunked fp32 cross-entropy (model.model.cross_entropy_fp32)
against F.cross_entropy(logits.float()), forward + backward, interleaved, with their largest differences (--no-ce
drops it).

--engine DS_CONFIG adds the launcher's step at --engine-length (default the longest length): the model built as the
launcher builds it, `launcher.engine.create_engine` (ZeRO, the JSON's precision and optimizer), micro-batches of
--engine-tokens tokens with accumulation 1, forward, backward and engine.step(). Not a test: it prints a table and
exits (--json writes the figures).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launcher import steptime  # noqa: E402
from launcher.compile import StageCompiler  # noqa: E402
from launcher.metrics import gpu_peak_tflops  # noqa: E402
from model import CausalLM, ModelConfig  # noqa: E402
from model.attention import attention_pairs, flash_unusable_reason  # noqa: E402
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


def causal_flops_per_token(model: CausalLM, seq_len: int) -> float:
    """Training FLOPs per token with the attention a causal kernel computes (T (T + 1) / 2 pairs per row)."""
    return model.matmul_flops_per_token() + model.attention_flops(attention_pairs(1, seq_len)) / seq_len


def hf_twin(ours: CausalLM):
    """transformers' GPTNeoXForCausalLM (sdpa) with our weights; None when transformers does not import."""
    try:
        import transformers
    except ImportError:
        return None
    hf = transformers.GPTNeoXForCausalLM._from_config(transformers.GPTNeoXConfig(**hf_config_dict(ours.config)),
                                                      attn_implementation="sdpa")
    hf.config.use_cache = False
    sd = state_dict_to_hf(ours.state_dict())
    if "embed_out.weight" not in hf.state_dict():  # transformers 5 names the head lm_head in memory
        sd["lm_head.weight"] = sd.pop("embed_out.weight")
    hf.load_state_dict(sd, strict=True)
    return hf


def build_models(preset: str, vocab: int, dtype, device, compile_: bool) -> tuple[dict, StageCompiler | None]:
    """{name: (model, step function)} with the same weights, and the compiler of the "compiled" copy."""
    torch.manual_seed(0)
    ours = CausalLM(ModelConfig.from_preset(preset, vocab_size=vocab, attention="sdpa"))
    models = {}
    hf = hf_twin(ours)
    models["ours"] = (ours.to(device, dtype).train(), step_ours)
    compiler = None
    if compile_:
        compiled = copy.deepcopy(ours)
        compiler = StageCompiler(compiled, True, device, dtype)
        models["compiled"] = (compiled, step_ours)
    if flash_unusable_reason(device, dtype) is None:
        flash = CausalLM(ModelConfig.from_preset(preset, vocab_size=vocab, attention="flash"))
        flash.load_state_dict(ours.state_dict())
        models["flash"] = (flash.to(device, dtype).train(), step_ours)
    if hf is not None:
        models["hf"] = (hf.to(device, dtype).train(), step_hf)
    return models, compiler


def step_ours(model, window):
    """window: (B, T + 1); the model sees T tokens and predicts the next."""
    model(window[:, :-1], labels=window[:, 1:]).backward()


def step_hf(model, window):
    # transformers shifts labels itself: it gets the T input tokens as both (T - 1 predictions of the same targets)
    x = window[:, :-1]
    model(input_ids=x, labels=x, use_cache=False).loss.backward()


def measure_lengths(models: dict, compiler, lengths, tokens_per_batch: int, vocab: int, repeats: int, device,
                    peak_flops: float | None, dtype) -> list[dict]:
    """Per length: tokens/s, MFU (PaLM and causal) and step time of every model, interleaved."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    probe = None if peak_flops else MatmulProbe(dtype)
    ours = models["ours"][0]
    rows = []
    for T in lengths:
        B = max(1, tokens_per_batch // T)
        window = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(T)).to(device)
        compile_s = compiler.compile_stage(T, B, T) if compiler else None
        times = {name: [] for name in models}
        oom, rates = {}, []
        for rep in range(repeats + 1):  # rep 0 is the warm-up
            if probe:
                rates.append(probe())
            for name, (model, step) in models.items():
                if name in oom:
                    continue
                model.zero_grad(set_to_none=True)
                sync()
                t0 = time.perf_counter()
                try:
                    steptime.run_guarded(lambda: (step(model, window), sync()), T)
                except steptime.OutOfMemory as e:
                    oom[name] = e.detail
                    model.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache() if cuda else None
                    continue
                if rep:
                    times[name].append(time.perf_counter() - t0)
        peak = peak_flops or statistics.median(rates)
        cells = {name: {"oom": detail} for name, detail in oom.items()}
        for name, ts in times.items():
            if name in oom:
                continue
            tok_s = B * T / statistics.median(ts)
            cells[name] = {"tokens_per_s": tok_s, "step_s": statistics.median(ts),
                           "mfu_palm": ours.flops_per_token(T) * tok_s / peak,
                           "mfu_causal": causal_flops_per_token(ours, T) * tok_s / peak}
        rows.append({"seq_len": T, "batch": B, "compile_s": compile_s, "peak_tflops": peak / 1e12,
                     "recompiles": compiler.recompiles if compiler else None, "models": cells})
        models_done = ", ".join(f"{n} {c['tokens_per_s']:,.0f} tok/s" for n, c in cells.items() if "oom" not in c)
        print(f"  measured L={T}: {models_done}", flush=True)
    return rows


def measure_engine(preset: str, vocab: int, seq_len: int, micro_batch: int, ds_config: str, steps: int, device,
                   peak_flops: float | None) -> dict:
    """The launcher's training step through its DeepSpeed engine (``ds_config``, accumulation 1, scheduler dropped:
    a constant rate does not change the step's cost): tokens/s, step time and MFU over ``steps`` timed steps after
    one warm-up step. Starts a process group of one when none exists."""
    import torch.distributed as dist
    from launcher import distributed
    from launcher import engine as ds
    from launcher.ds_config import load_ds_config
    from launcher.optim import param_groups

    own_group = not dist.is_initialized()
    if own_group:
        ds.init_distributed()
    try:
        world = dist.get_world_size()
        cfg = {k: v for k, v in load_ds_config(ds_config).items() if k != "scheduler"}
        cfg.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
                   train_batch_size=micro_batch * world)
        torch.manual_seed(0)
        model = CausalLM(ModelConfig.from_preset(preset, vocab_size=vocab))
        engine = ds.create_engine(model, cfg, param_groups(model))
        window = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=torch.Generator().manual_seed(1))
        window = window.to(distributed.device())
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = []
        for i in range(steps + 1):
            sync()
            t0 = time.perf_counter()
            loss = engine(window[:, :-1], labels=window[:, 1:])
            engine.backward(loss)
            engine.step()
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        step_s = statistics.median(times)
        tok_s = micro_batch * seq_len / step_s
        out = {"ds_config": ds_config, "preset": preset, "seq_len": seq_len, "micro_batch": micro_batch,
               "tokens_per_step": micro_batch * seq_len, "precision": "bf16" if cfg.get("bf16", {}).get("enabled")
               else "fp32", "zero_stage": cfg.get("zero_optimization", {}).get("stage", 0),
               "optimizer": type(engine.basic_optimizer).__name__, "steps": steps, "step_s": step_s,
               "tokens_per_s": tok_s, "loss": float(loss)}
        if peak_flops:
            out.update(mfu_palm=model.flops_per_token(seq_len) * tok_s / peak_flops,
                       mfu_causal=causal_flops_per_token(model, seq_len) * tok_s / peak_flops)
        del engine, model
        return out
    finally:
        if own_group:
            ds.close()


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
                        device: torch.device = torch.device("cpu")) -> dict:
    r = compare_cross_entropy(tokens, vocab, DTYPES[dtype_name], repeats, device)
    peak = "" if r["ours_peak"] is None else \
        f" | peak MB ours {r['ours_peak'] / 2**20:,.0f} torch {r['torch_peak'] / 2**20:,.0f}"
    print(f"cross-entropy at ({tokens}, {vocab}) {dtype_name} on {device}, forward+backward: "
          f"ours {r['ours_s'] * 1e3:.1f} ms, "
          f"F.cross_entropy(logits.float()) {r['torch_s'] * 1e3:.1f} ms ({r['torch_s'] / r['ours_s']:.2f}x){peak} | "
          f"max |loss diff| {r['loss_diff']:.1e}, max |grad diff| {r['grad_diff']:.1e}")
    return r


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def table(rows: list[dict], names: list[str]) -> str:
    lines = [f"{'seq_len':>7} {'batch':>5} | " + " ".join(f"{n + ' tok/s':>14}" for n in names) + " | "
             + " ".join(f"{n + ' MFU':>14}" for n in names) + f" | {'ours/hf':>7} | {'compile s':>9}",
             "MFU: causal (PaLM convention in brackets)"]
    for r in rows:
        cells = [r["models"].get(n, {}) for n in names]
        tps = [("OOM" if "oom" in c else f"{c['tokens_per_s']:,.0f}") if c else "-" for c in cells]
        mfu = [("OOM" if "oom" in c else f"{_pct(c['mfu_causal'])} ({_pct(c['mfu_palm'])})") if c else "-"
               for c in cells]
        ours, hf = r["models"].get("ours", {}), r["models"].get("hf", {})
        ratio = f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if "tokens_per_s" in ours and \
            "tokens_per_s" in hf else "-"
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        lines.append(f"{r['seq_len']:>7} {r['batch']:>5} | " + " ".join(f"{t:>14}" for t in tps) + " | "
                     + " ".join(f"{m:>14}" for m in mfu) + f" | {ratio:>7} | {compile_s:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="pythia-70m")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    p.add_argument("--tokens-per-batch", type=int, default=2048)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per model per length (after 1 warm-up)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled column")
    p.add_argument("--no-ce", action="store_true", help="skip the cross-entropy comparison")
    p.add_argument("--ce-device", help="device of the cross-entropy comparison (default --device)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU when the GPU is not in the table")
    p.add_argument("--engine", metavar="DS_CONFIG", help="add the launcher-shaped cell through this DeepSpeed JSON")
    p.add_argument("--engine-length", type=int, help="its sequence length (default the longest --lengths)")
    p.add_argument("--engine-tokens", type=int, default=65536, help="its tokens per micro-batch (= per step)")
    p.add_argument("--engine-steps", type=int, default=5, help="its timed optimizer steps (after 1 warm-up)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_model: --device cuda but CUDA is not usable here (python benchmarks/cuda_env.py says why)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads) if device.type == "cpu" else None
    dtype = DTYPES[args.dtype]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    peak_tflops = args.peak_tflops or (gpu_peak_tflops(gpu) if gpu else None)
    if gpu and peak_tflops is None:
        print(f"bench_model: no peak is known for {gpu}: MFU is against --peak-tflops (give it)", file=sys.stderr)
    peak = peak_tflops * 1e12 if peak_tflops else None
    models, compiler = build_models(args.preset, args.vocab, dtype, device, not args.no_compile)
    names = list(models)
    print(f"{args.preset} shape, vocab {args.vocab}, {args.dtype}, {gpu or f'CPU, {args.threads} threads'}, "
          f"{args.tokens_per_batch} tokens/batch, torch {torch.__version__}, {args.repeats} interleaved rounds; "
          f"peak {f'{peak_tflops:g} TFLOP/s' if peak else 'a 2048^3 matmul timed in the loop'}", flush=True)
    rows = measure_lengths(models, compiler, args.lengths, args.tokens_per_batch, args.vocab, args.repeats, device,
                           peak, dtype)
    del models, compiler
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(table(rows, names))
    report = {"preset": args.preset, "vocab": args.vocab, "dtype": args.dtype, "device": gpu or "cpu",
              "torch": torch.__version__, "tokens_per_batch": args.tokens_per_batch, "repeats": args.repeats,
              "peak_tflops": peak_tflops, "models": names, "lengths": rows}
    if not args.no_ce:
        vocab = ModelConfig.from_preset(args.preset, vocab_size=args.vocab).padded_vocab_size
        report["cross_entropy"] = print_cross_entropy(args.tokens_per_batch, vocab, args.dtype, args.repeats,
                                                      torch.device(args.ce_device or args.device))
    if args.engine:
        L = args.engine_length or max(args.lengths)
        mb = max(1, args.engine_tokens // L)
        cell = measure_engine(args.preset, args.vocab, L, mb, args.engine, args.engine_steps, device, peak)
        report["engine"] = cell
        print(f"launcher step ({cell['ds_config']}: ZeRO-{cell['zero_stage']}, {cell['precision']}, "
              f"{cell['optimizer']}), L={L}, micro-batch {mb} x accum 1: {cell['tokens_per_s']:,.0f} tok/s, "
              f"{cell['step_s'] * 1e3:.0f} ms/step, MFU causal {_pct(cell.get('mfu_causal'))} "
              f"(PaLM {_pct(cell.get('mfu_palm'))})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
