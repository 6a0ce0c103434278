"""The `rayexec` command (also `python -m rayexec`).

Subcommands:
  config    print every ExecutorConfig field: environment variable, default, meaning
            (--markdown for the README table)
  layout    start an executor with a worker that only reports where it runs, print
            the rank layout (rank -> node IP, pp/tp rank, devices) and stop
  generate  serve the reference decoder (rayexec.models) as PP x TP workers, greedy-
            generate, print layout, tokens/s, time to first token, step latency
  rl        the reference RL loop: generate -> train one step -> update_weights ->
            generate, each round checked against a single-process model
Each subcommand lives in a small function; heavy imports happen inside them.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import sys
from collections.abc import Callable, Sequence

from rayexec import config as config_module
from rayexec.config import ExecutorConfig
from rayexec.envs import FIELD_TO_VAR

SUBCOMMANDS: dict[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]]
SUBCOMMANDS = {}


def subcommand(name: str):
    def register(fn):
        SUBCOMMANDS[name] = fn
        return fn
    return register


def field_docs() -> dict[str, str]:
    """ExecutorConfig attribute docstrings (the text under each field)."""
    tree = ast.parse(inspect.getsource(config_module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ExecutorConfig")
    docs, last = {}, None
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
              and isinstance(node.value.value, str) and last):
            docs[last] = " ".join(node.value.value.split())
            last = None
    return docs


def config_rows() -> list[tuple[str, str, str, str]]:
    docs = field_docs()
    rows = []
    for f in dataclasses.fields(ExecutorConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f.name, FIELD_TO_VAR.get(f.name, "-"), repr(default), docs.get(f.name, "")))
    return rows


@subcommand("config")
def _config(parser: argparse.ArgumentParser):
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")

    def run(args: argparse.Namespace) -> int:
        rows = config_rows()
        if args.markdown:
            print("| field | environment variable | default | meaning |")
            print("|---|---|---|---|")
            for name, var, default, doc in rows:
                doc = doc.replace("|", "\\|")
                print(f"| `{name}` | `{var}` | `{default}` | {doc} |".replace("`-`", "-"))
        else:
            for name, var, default, doc in rows:
                print(f"{name:<24} {var:<34} {default:<26} {doc}")
        return 0
    return run


@subcommand("layout")
def _layout(parser: argparse.ArgumentParser):
    parser.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--device", default="auto", help="auto|cuda|rocm|npu|cpu")

    def run(args: argparse.Namespace) -> int:
        from rayexec import RayDistributedExecutor
        from rayexec.layout import format_layout

        cfg = ExecutorConfig.from_env(pipeline_parallel_size=args.pp,
                                      tensor_parallel_size=args.tp, device=args.device,
                                      worker_cls=_ReportOnly, forward="rpc")
        with RayDistributedExecutor(cfg) as ex:
            print(format_layout(ex.layout, ex.platform))
        return 0
    return run


class _ReportOnly:
    """A worker that does nothing: `rayexec layout` only shows where ranks land."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def execute_model(self, batch, intermediate=None):
        return batch


@subcommand("generate")
def _generate(parser: argparse.ArgumentParser):
    """Serve the reference decoder with PP x TP workers and greedy-generate."""
    parser.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size")
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    parser.add_argument("--prompts", type=int, default=8, help="number of prompts")
    parser.add_argument("--prompt-len", type=int, default=16,
                        help="longest prompt (lengths vary from half of it)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--model", default="small", help="decoder preset: small|large")
    parser.add_argument("--seed", type=int, default=0,
                        help="fixes the weights and the prompts (same for every layout)")
    parser.add_argument("--device", default="auto", help="auto|cuda|rocm|cpu")
    parser.add_argument("--forward", default="dag", choices=["dag", "rpc"],
                        help="compiled Ray DAG or plain Ray calls per step")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")

    def run(args: argparse.Namespace) -> int:
        import json

        from rayexec import RayDistributedExecutor
        from rayexec.layout import format_layout
        from rayexec.models import (
            DecoderConfig,
            decoder_executor_config,
            generate,
            make_prompts,
        )

        model = DecoderConfig.from_any(args.model)
        cfg = decoder_executor_config(args.pp, args.tp, model=args.model, seed=args.seed,
                                      device=args.device, forward=args.forward)
        prompts = make_prompts(args.prompts, args.prompt_len, model.vocab_size, args.seed)
        with RayDistributedExecutor(cfg) as ex:
            transport = f" over {ex.transport}" if ex.transport else ""
            print(f"layout: PP={args.pp} x TP={args.tp} on {ex.platform.name}, "
                  f"forward={args.forward}{transport}")
            print(format_layout(ex.layout, ex.platform), flush=True)
            ex.warmup()
            generate(ex, prompts[:1], 2)  # warm-up, excluded from the numbers
            progress = _Progress(f"generating {len(prompts)} prompts x "
                                 f"{args.max_new_tokens} tokens")
            result = generate(ex, prompts, args.max_new_tokens, progress=progress)
            progress.close()
            layout = [{"rank": p.rank, "node_ip": p.node_ip, "pp_rank": p.pp_rank,
                       "tp_rank": p.tp_rank, "local_rank": p.local_rank,
                       "devices": list(p.visible_devices) or None} for p in ex.layout]
        s = result.summary()
        print(f"tokens/s: {s['tokens_per_s']:.1f} ({s['tokens']} tokens in "
              f"{s['elapsed_s']:.2f} s)")
        print(f"time to first token: {s['ttft_s'] * 1e3:.1f} ms (median over prompts; "
              f"max {s['ttft_max_s'] * 1e3:.1f} ms)")
        if s["step_ms_median"] is not None:
            print(f"decode step latency: median {s['step_ms_median']:.2f} ms, "
                  f"p90 {s['step_ms_p90']:.2f} ms ({s['decode_steps']} steps)")
        print(f"first generated ids (prompt 0): {result.token_ids[0][:16]}")
        if args.json:
            record = {"layout": layout, "token_ids": result.token_ids, **s,
                      "pp": args.pp, "tp": args.tp, "device": ex.platform.name,
                      "forward": args.forward, "model": args.model, "seed": args.seed,
                      "prompts": args.prompts, "max_new_tokens": args.max_new_tokens}
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)
            print(f"wrote {args.json}")
        return 0
    return run


@subcommand("rl")
def _rl(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """generate -> train -> update_weights -> generate, checked against one process"""
    parser.add_argument("--train-dp", type=int, default=1)
    parser.add_argument("--train-tp", type=int, default=1)
    parser.add_argument("--serve-pp", type=int, default=1)
    parser.add_argument("--serve-tp", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--colocate", action="store_true",
                        help="trainer and executor on the same placement-group bundles")
    parser.add_argument("--model", default="small", help="decoder preset (small, large) or "
                        "'tiny' (a 4-layer model for quick checks)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--json", metavar="PATH", help="write the per-iteration records here")

    def run(args: argparse.Namespace) -> int:
        import json

        from rayexec.models.rl import TINY, run_rl

        model = TINY if args.model == "tiny" else args.model
        records = run_rl(args.train_dp, args.train_tp, args.serve_pp, args.serve_tp,
                         args.iterations, model=model, colocate=args.colocate,
                         num_prompts=args.prompts, max_new_tokens=args.max_new_tokens)
        for r in records:
            print(f"version {r['version']}: loss {r['loss']:.4f}, sync {r['sync_s'] * 1e3:.1f} "
                  f"ms, {r['bytes'] / 2**20:.1f} MiB, identical={r['identical']} "
                  f"(max logit diff {r['max_logit_diff']:.2e})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "iterations": records}, f, indent=1)
            print(f"wrote {args.json}")
        return 0 if all(r["identical"] for r in records) else 1
    return run


class _Progress:
    """A one-line progress counter: rewritten in place on a terminal, else printed
    at each quarter."""

    def __init__(self, label: str) -> None:
        self.label, self.tty, self.shown = label, sys.stderr.isatty(), -1

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            print(f"\r{self.label}: {done}/{total} tokens", end="", file=sys.stderr, flush=True)
        elif done * 4 // total > self.shown:
            self.shown = done * 4 // total
            print(f"{self.label}: {done}/{total} tokens", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayexec", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, build in SUBCOMMANDS.items():
        doc = (build.__doc__ or "").strip()
        runners[name] = build(sub.add_parser(name, help=doc or None))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
