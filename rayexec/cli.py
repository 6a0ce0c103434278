"""The `rayexec` command (also `python -m rayexec`).

Subcommands:
  config    print every ExecutorConfig field: environment variable, default, meaning
            (--markdown for the README table)
  layout    start an executor with a worker that only reports where it runs, print
            the rank layout (rank -> node IP, pp/tp rank, devices) and stop
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
