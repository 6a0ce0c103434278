"""Run one vLLM engine through vLLM's own weight-update path and write JSON.

    python tests/vllm/run_weight_update.py --model OLD --new NEW --backend rayexec \
        --tp 2 --pp 1 --out out.json

With `--backend mp` the engine is the reference: it is started from NEW and only
generates (`token_ids`: all prompts in one generate; `token_ids_single`: one
prompt per generate).

With `--backend rayexec` the engine starts from OLD with
`worker_extension_cls=WeightReloadExtension`, generates (`before`), reloads NEW
through `collective_rpc("reload_weights_from", ...)` and generates (`after`),
then tries updates that must be refused (`errors`: a wrong shape, a wrong
name; with the engine core in this process also a stalled and a killed
trainer) and generates after them (`after_refused`). What crosses into the
workers depends on where the engine core runs (VLLM_ENABLE_V1_MULTIPROCESSING):
- in this process: a Ray ObjectRef of NEW's state dict, put by a "trainer" actor
  in the engine's Ray (what an RL loop in the same Ray does); generates batch
  all prompts (the token tests' exact setting, docs/vllm-exactness.md);
- in vLLM's engine process: NEW's safetensors path, and for the refused updates
  safetensors bytes (no pickling: vLLM's msgpack carries both); generates take
  one prompt each, since there the batches of a multi-prompt generate depend on
  timing.

`--weight-transfer BACKEND` instead starts the engine with vLLM's
weight_transfer_config and records what rayexec gave it (`weight_transfer`).

Every engine runs in its own process (see run_engine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks`, `tests` importable
    sys.path.insert(0, str(ROOT))

from benchmarks.vllm_engines import prompt_ids  # noqa: E402
from tests.vllm.run_engine import PROMPT_LEN, generate, make_llm  # noqa: E402

EXTENSION = "rayexec.integrations.vllm.extension.WeightReloadExtension"
KILL_AFTER_S = 1.0  # the killed trainer dies this long after the update started
UPDATE_JOIN_S = 120.0  # bound on an update call that should end with an error
STALL_TIMEOUT_S = 2.0  # the workers' fetch bound given for the stalled trainer


class Trainer:
    """Stands in for an RL trainer rank: holds a state dict and hands it out."""

    def __init__(self, path: str) -> None:
        import safetensors.torch

        self.weights = safetensors.torch.load_file(path)

    def state_dict(self, delay_s: float = 0.0) -> dict:
        time.sleep(delay_s)
        return self.weights


def generate_each(llm, count: int, max_tokens: int) -> list[list[int]]:
    """One prompt per generate: the same batches whatever the timing."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [list(llm.generate([TokensPrompt(prompt_token_ids=p)], params,
                              use_tqdm=False)[0].outputs[0].token_ids)
            for p in prompt_ids(count, PROMPT_LEN)]


def error_text(fn) -> str | None:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def broken_copies(path: str) -> dict[str, bytes]:
    """NEW's weights with one wrong shape, and with one wrong name (as bytes)."""
    import safetensors.torch

    weights = safetensors.torch.load_file(path)
    wrong_shape = dict(weights)
    wrong_shape["model.norm.weight"] = weights["model.norm.weight"][:-1].clone()
    wrong_name = dict(weights)
    wrong_name["model.layers.0.mlp.gate_prj.weight"] = wrong_name.pop(
        "model.layers.0.mlp.gate_proj.weight")
    return {"wrong_shape": safetensors.torch.save(wrong_shape),
            "wrong_name": safetensors.torch.save(wrong_name)}


def update_in_process(llm, new_file: str, result: dict, gen) -> None:
    """ObjectRefs from a trainer actor in the engine's Ray, then refused updates."""
    import ray

    trainer_cls = ray.remote(num_cpus=0)(Trainer)
    trainer = trainer_cls.remote(new_file)
    result["summary"] = llm.collective_rpc("reload_weights_from",
                                           args=([trainer.state_dict.remote()],))
    llm.reset_prefix_cache()  # no KV computed with the old weights is reused
    result["after"] = gen()
    errors = {name: error_text(lambda b=blob: llm.collective_rpc("reload_weights_from",
                                                                 args=(b,)))
              for name, blob in broken_copies(new_file).items()}
    stalled = trainer.state_dict.remote(3600.0)
    errors["stalled_trainer"] = error_text(lambda: llm.collective_rpc(
        "reload_weights_from", args=([stalled], STALL_TIMEOUT_S)))
    ray.kill(trainer)
    # Killed mid-update: the workers are already waiting for its weights.
    doomed = trainer_cls.remote(new_file)
    pending = doomed.state_dict.remote(3600.0)
    outcome: dict = {}
    call = threading.Thread(target=lambda: outcome.update(error=error_text(
        lambda: llm.collective_rpc("reload_weights_from", args=([pending],)))))
    call.start()
    time.sleep(KILL_AFTER_S)
    ray.kill(doomed)
    call.join(UPDATE_JOIN_S)
    errors["killed_trainer"] = outcome.get("error", f"still waiting after {UPDATE_JOIN_S} s")
    result["errors"] = errors


def update_across_socket(llm, new_file: str, result: dict, gen) -> None:
    """A path, then refused updates as safetensors bytes."""
    result["summary"] = llm.collective_rpc("reload_weights_from", args=(new_file,))
    llm.reset_prefix_cache()
    result["after"] = gen()
    result["errors"] = {name: error_text(lambda b=blob: llm.collective_rpc(
        "reload_weights_from", args=(b,))) for name, blob in broken_copies(new_file).items()}


def weight_transfer_report(llm, backend: str) -> dict:
    """What rayexec gave vLLM's weight_transfer engine (engine core in-process)."""
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    report = {"tensor_transport": [bool(a._ray_enable_tensor_transport)
                                   for a in executor.rayexec.workers],
              "engines": llm.collective_rpc(
                  lambda w: type(w.worker.weight_transfer_engine).__name__)}
    # The trainer-side set-up reaches every worker's engine through collective_rpc
    # (LLM.init_weight_transfer_engine); with no trainer running, vLLM's engine
    # must say what it looked for.
    if backend == "sharded_rdt":
        info = {"trainer_actor_names": ["no-such-trainer"], "trainer_actor_namespace": "none"}
        report["init_error"] = error_text(lambda: llm.init_weight_transfer_engine(
            {"init_info": info}))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--new", help="checkpoint directory with the new weights")
    parser.add_argument("--backend", default="rayexec")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--weight-transfer", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # As the token tests: Dynamo mode with PP (vLLM 0.32's eager PP fails on CPU),
    # one micro-batch per stage.
    args.mode, args.micro_batches = ("dynamo" if args.pp > 1 else "eager"), args.pp
    in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"

    result: dict = {"backend": args.backend, "tp": args.tp, "pp": args.pp,
                    "in_process": in_process}
    if args.weight_transfer:
        llm = make_llm(args, weight_transfer_config={"backend": args.weight_transfer})
        result["weight_transfer"] = weight_transfer_report(llm, args.weight_transfer)
    elif args.backend == "mp":
        llm = make_llm(args)
        result["token_ids"] = generate(llm, args.prompts, args.max_tokens)
        result["token_ids_single"] = generate_each(llm, args.prompts, args.max_tokens)
    else:
        llm = make_llm(args, worker_extension_cls=EXTENSION)

        def gen():
            if in_process:
                return generate(llm, args.prompts, args.max_tokens)
            return generate_each(llm, args.prompts, args.max_tokens)

        new_file = str(Path(args.new) / "model.safetensors")
        result["before"] = gen()
        if in_process:
            update_in_process(llm, new_file, result, gen)
        else:
            update_across_socket(llm, new_file, result, gen)
        result["after_refused"] = gen()
    llm.llm_engine.engine_core.shutdown()
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
