"""vLLM's OpenAI-compatible server with rayexec's backend, pipeline parallel included.

    python -m rayexec.integrations.vllm.serve --model M --tensor-parallel-size 2 \
        --pipeline-parallel-size 2 [any other vLLM server option]

`vllm serve --distributed-executor-backend rayexec.integrations.vllm.RayexecExecutor`
works for tensor parallelism only: vLLM checks `supports_pp` on the backend before
it resolves a dotted path, so a string is refused when PP > 1. This launcher does
what vLLM's own server entry point does (vLLM 0.32,
`vllm.entrypoints.launchers.api_server.entry.main`) with one change: the backend is
the class object. Every other option is vLLM's; a --distributed-executor-backend
given here is replaced (with a warning).

It is a thin launcher over vLLM internals, not a server of its own; newer vLLM
versions may move these functions.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from rayexec.integrations.vllm import RayexecExecutor

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(
        description="vLLM's OpenAI-compatible server on rayexec's executor backend."))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging_from_args(args)
    if args.distributed_executor_backend not in (None, RayexecExecutor):
        logger.warning("--distributed-executor-backend=%s replaced by RayexecExecutor",
                       args.distributed_executor_backend)
    args.distributed_executor_backend = RayexecExecutor
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))


if __name__ == "__main__":
    main()
