"""Run one vLLM engine on rayexec with a trainer group next to it, push the
trainer's weights in with rayexec's direct path, and write what happened as JSON.

    python tests/vllm/run_direct.py --model DIR --tp 2 --pp 1 --save CKPT --out out.json

Same engine settings and prompts as run_engine.py (whose helpers it uses), engine
core in this process. Steps: generate (`token_ids_before`); one optimizer step of
the trainer on the generated sequences; `update_weights` with the part of every
full-shaped tensor a rank did not receive filled with NaN (a loader that read it
would turn the tokens to garbage); generate (`token_ids_after`); the trainer saves
its weights as sent to --save (a fresh `mp` engine from there must agree).
`--via` picks the sync's route (default auto: the object store on this machine);
`--no-fill` leaves the unreceived part alone, so that a rank whose pieces are views
of whole tensors in the object store loads those tensors as they are (no copy).
`--errors` then tries three bad updates (a renamed tensor, a wrong shape, a trainer
rank that dies midway) and generates after each (`errors`).
`--engine-process` starts the engine core in its own process instead and only
records what update_weights says (`refusal`).
`--colocate` puts the trainer and vLLM's workers on the same bundles of one
placement group and records each side's (placement group, bundle) (`bundles`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.vllm_engines import prompt_ids  # noqa: E402
from tests.vllm.run_engine import (  # noqa: E402
    PROMPT_LEN,
    by_prompt,
    generate,
    make_llm,
    record_batches,
)

GROUP_NAME = "rayexec-rl-colocated"


def placement_group_id(worker) -> str | None:
    import ray

    return ray.get_runtime_context().get_placement_group_id()


def try_update(llm, group, **kw) -> dict:
    from rayexec.integrations.vllm import update_weights

    start = time.monotonic()
    try:
        update_weights(llm, group, **kw)
        return {"error": None}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}", "seconds": round(time.monotonic() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--save", required=True)
    parser.add_argument("--errors", action="store_true")
    parser.add_argument("--via", default="auto")
    parser.add_argument("--no-fill", action="store_true")
    parser.add_argument("--colocate", action="store_true")
    parser.add_argument("--engine-process", action="store_true",
                        help="engine core in its own process: record update_weights' refusal")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # functions via collective_rpc
    args.backend, args.mode = "rayexec", "dynamo" if args.pp > 1 else "eager"
    args.micro_batches = args.pp

    if args.engine_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        llm = make_llm(args)
        refusal = try_update(llm, None)  # refused before the source is even looked at
        llm.llm_engine.engine_core.shutdown()
        with open(args.out, "w") as f:
            json.dump({"refusal": refusal["error"]}, f)
        return

    import ray

    from rayexec.group import WorkerGroup
    from rayexec.resources import ResourceConfig
    from tests.vllm.direct_workers import FaultyHfTrainer

    world = args.tp * args.pp
    ray.init(num_cpus=max(2, world))
    trainer_kw = {"model": args.model, "dp": 2, "lr": 1e-3}
    if args.colocate:
        # One bundle per vLLM worker, each big enough for it and one trainer rank.
        pg = ray.util.placement_group([{"CPU": 1}] * world, name=GROUP_NAME)
        ray.get(pg.ready(), timeout=60)
        os.environ["RAYEXEC_PLACEMENT_GROUP_NAME"] = GROUP_NAME
        os.environ["RAYEXEC_BUNDLE_INDICES"] = ",".join(map(str, range(world)))
        group = WorkerGroup.from_placement_group(
            FaultyHfTrainer, trainer_kw, pg, bundle_indices=[0, 1], device="cpu",
            num_devices_per_worker=0.5)
    else:
        group = WorkerGroup.from_config(FaultyHfTrainer, trainer_kw,
                                        ResourceConfig(num_workers=2, cpus_per_worker=0.1))
    group.run("init_device")
    result: dict = {"tp": args.tp, "pp": args.pp}
    llm = make_llm(args)
    batches = record_batches(llm)
    before = generate(llm, args.prompts, args.max_tokens)
    result["token_ids_before"] = before
    if args.colocate:
        # Ray shows an actor its group, not its bundle: the bundles are rayexec's
        # record of what it asked Ray for; each bundle fits one actor of each side.
        from rayexec.integrations.vllm.direct import rayexec_executor

        engine_group = rayexec_executor(llm).rayexec._group
        result["bundles"] = {
            "trainer": [list(x) for x in zip(group.run(placement_group_id),
                                             group.placement.bundle_indices)],
            "vllm": [list(x) for x in zip(llm.collective_rpc(placement_group_id),
                                          engine_group.placement.bundle_indices)]}
    sequences = [p + o for p, o in zip(prompt_ids(args.prompts, PROMPT_LEN), before)]
    result["losses"] = group.run("train_step", (sequences,))
    if args.colocate:
        from vllm.platforms import current_platform

        # The rollout side cannot free its memory on CPU (no vLLM sleep mode there);
        # the trainer frees its gradients before vLLM works again.
        result["vllm_sleep_mode_available"] = current_platform.is_sleep_mode_available()
        result["trainer_freed_bytes"] = [r["freed_bytes"] for r in group.run("sleep", (1,))]
    if not args.no_fill:
        llm.collective_rpc("set_unreceived_fill", args=(float("nan"),))
    from rayexec.integrations.vllm import update_weights

    report = update_weights(llm, group, version=1, via=args.via)
    result["update"] = {"seconds": report.seconds, "bytes": report.bytes, "route": report.route,
                        "bytes_by_destination_rank": report.bytes_by_destination_rank,
                        "bytes_by_source_rank": report.bytes_by_source_rank}
    result["layouts"] = [{n: [s.dim, s.parts, s.index] for n, s in layout.items()}
                         for layout in llm.collective_rpc("weight_layout")]
    if batches is not None:
        batches.append([])
    result["token_ids_after"] = generate(llm, args.prompts, args.max_tokens)
    group.run("save", (args.save,), ranks=[0])
    if args.errors:
        result["errors"] = {}
        for fault in ("rename", "reshape", "die"):
            group.run("set_fault", (fault,))
            outcome = try_update(llm, group, version=f"bad-{fault}", timeout=120)
            if batches is not None:
                batches.append([])
            outcome["token_ids"] = generate(llm, args.prompts, args.max_tokens)
            result["errors"][fault] = outcome
    if batches is not None:
        result["batches"] = [by_prompt(steps) for steps in batches]
    llm.llm_engine.engine_core.shutdown()
    group.shutdown()
    ray.shutdown()
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
