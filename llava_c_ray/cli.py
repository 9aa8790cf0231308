"""`llava-c`: parse the command line, hand it to one library function, turn user errors into one message."""

from __future__ import annotations

import argparse
import sys

from llava_c_ray.config import dump_job, load_job
from llava_c_ray.errors import LlavaCError


def config_show(args: argparse.Namespace) -> int:
    print(dump_job(load_job(args.job, args.overrides, check_files=not args.no_check_files)), end="")
    return 0


def methods_list(args: argparse.Namespace) -> int:
    from llava_c_ray.methods import METHODS

    for method in METHODS.values():
        print(f"{method.name:10s} {method.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-c", description="Continual visual instruction tuning of LLaVA models on Ray."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="inspect job configs")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved job config")
    show.add_argument("job", help="job YAML")
    show.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.lr=1e-4")
    show.add_argument("--no-check-files", action="store_true", help="do not require data files")
    show.set_defaults(handler=config_show)

    methods = commands.add_parser("methods", help="list the registered methods")
    methods.set_defaults(handler=methods_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except LlavaCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
