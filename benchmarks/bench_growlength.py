"""GrowLength vs fixed-length training (LLM128, LLM1024) through the real launcher: tokens/s per stage, wall-clock for
one token budget, stage-switch overhead. Prints figures; method and results: docs/benchmarks.md.

    python benchmarks/bench_growlength.py [--preset tiny] [--steps 24] [--tokens-per-step 8192] [--ranks 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from evidence.launch import launch_command  # noqa: E402

PLANS = {
    "LLM128": [{"seq_len": 128, "share": 1.0}],
    "LLM1024": [{"seq_len": 1024, "share": 1.0}],
    "GrowLength": [{"seq_len": n, "share": 0.25} for n in (128, 256, 512, 1024)],
}


def run(name: str, stages: list, args, work: Path) -> list[dict]:
    run_dir = work / name
    cmd = ["--ds_config", args.ds_config,
           f"run_dir={run_dir}", f"model.preset={args.preset}", f"data.builtin_dir={args.builtin_dir}",
           f"growlength.tokens_per_step={args.tokens_per_step}",
           f"growlength.total_tokens={args.tokens_per_step * args.steps}", f"growlength.stages={json.dumps(stages)}",
           "data.valid_fraction=0", "checkpointing.at_stage_end=false", "checkpointing.interval_steps=0",
           "logging.tensorboard=false", "logging.log_interval=1000"]
    launch, env = launch_command(args.ranks)  # a free rendezvous port: never collides with another job
    subprocess.run(launch + cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run (a multiple of 4)")
    p.add_argument("--tokens-per-step", type=int, default=8192)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--ds_config", default=str(ROOT / "ds_configs" / "zero2.json"))
    p.add_argument("--builtin-dir", default=str(ROOT / ".cache" / "growlength" / "builtin"))
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, stages in PLANS.items():
            print(f"running {name} ...", flush=True)
            results[name] = run(name, stages, args, Path(tmp))
    print(f"\npreset {args.preset}, {args.ranks} rank(s), {args.tokens_per_step:,} tokens/step, {args.steps} steps "
          f"= {args.tokens_per_step * args.steps:,} tokens per run\n")
    print(f"{'run':<11} {'stage':>5} {'seq_len':>7} {'steps':>5} {'tok/s (median)':>15} {'step s':>7}")
    wall = {}
    for name, records in results.items():
        steps = [r for r in records if "kind" not in r]
        switches = [r for r in records if r.get("kind") == "stage"]
        wall[name] = sum(r["tokens_per_step"] / r["tokens_per_s"] for r in steps)
        for sw in switches:
            mine = [r for r in steps if r["stage"] == sw["stage"]]
            rates = [r["tokens_per_s"] for r in mine[1:]] or [mine[0]["tokens_per_s"]]
            med = statistics.median(rates)
            print(f"{name:<11} {sw['stage']:>5} {sw['seq_len']:>7} {len(mine):>5} {med:>15,.0f} "
                  f"{args.tokens_per_step / med:>7.3f}")
            if sw["stage"] > 0:
                print(f"{'':<11} switch overhead {sw['switch_s'] * 1e3:.1f} ms = "
                      f"{sw['switch_s'] / (args.tokens_per_step / med):.1%} of a step")
    print(f"\n{'run':<11} {'train wall-clock s':>18} {'vs LLM1024':>10}")
    for name, secs in wall.items():
        print(f"{name:<11} {secs:>18.1f} {secs / wall['LLM1024']:>10.2f}")
    print(f"\nGrowLength spends the same tokens in {wall['GrowLength'] / wall['LLM1024']:.2f}x the time of LLM1024 "
          f"({wall['LLM1024'] / wall['GrowLength']:.2f}x faster)")


if __name__ == "__main__":
    main()
