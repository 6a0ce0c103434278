"""RSS freed by executor.sleep(level) on CPU: the reference decoder after a
generation (KV cache filled), level 1 then level 2, per rank.

    python -m benchmarks.sleep_rss [--pp 1] [--tp 2] [--model small]

Prints one JSON line: per rank the bytes sleep() reports freeing (cache, weights)
and the process RSS before and after each level (read from /proc after malloc_trim).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--model", default="small")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    import ray

    from rayexec import RayDistributedExecutor
    from rayexec.models import decoder_executor_config, make_prompts
    from rayexec.models.config import DecoderConfig
    from rayexec.models.engine import generate

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    model = DecoderConfig.from_any(args.model)
    cfg = decoder_executor_config(args.pp, args.tp, model=args.model, device="cpu",
                                  forward="rpc", num_devices_per_worker=0.5)
    try:
        with RayDistributedExecutor(cfg) as ex:
            prompts = make_prompts(args.prompts, 32, model.vocab_size)
            # Keep the requests' caches: a generation frees them at its end, so fill
            # them with prefill steps that are never finished.
            from rayexec.models.batch import StepBatch

            ex.execute_model(StepBatch.prefill(list(range(1, len(prompts) + 1)), prompts))
            generate(ex, prompts[:1], 2)
            level1 = ex.sleep(1)
            level2 = ex.sleep(2)
            ex.wake_up()
        MiB = 2**20
        out = [{"rank": r,
                "level1_cache_MiB": l1["cache_bytes"] / MiB,
                "level1_rss_freed_MiB": (l1["rss_before"] - l1["rss_after"]) / MiB,
                "level2_weight_MiB": l2["weight_bytes"] / MiB,
                "level2_rss_freed_MiB": (l2["rss_before"] - l2["rss_after"]) / MiB,
                "rss_awake_MiB": l1["rss_before"] / MiB, "rss_level2_MiB": l2["rss_after"] / MiB}
               for r, (l1, l2) in enumerate(zip(level1, level2))]
        print(json.dumps({"model": args.model, "pp": args.pp, "tp": args.tp, "ranks": out}))
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
