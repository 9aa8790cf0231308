"""`llava-c consolidate`: parse the arguments, call `consolidate_checkpoint`, print where it went."""

from __future__ import annotations

import argparse
from pathlib import Path

from llava_c_ray.consolidate.spectral import BOUNDARIES

METHOD_NAMES = ("sac", "modelmix")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `consolidate` subcommand to a CLI's subparsers; its handler is `args.handler`."""
    parser = subparsers.add_parser(
        "consolidate", help="SAC / ModelMix of a tuned model or adapter into a base"
    )
    parser.add_argument("--base", required=True, type=Path, help="base HF checkpoint (θ̃_{t-1})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tuned", type=Path, help="tuned HF checkpoint (θ_t)")
    source.add_argument("--adapter", type=Path, help="peft LoRA adapter trained from the base")
    parser.add_argument("--method", choices=METHOD_NAMES, default="sac")
    parser.add_argument("--alpha", type=float, default=0.2, help="consolidation strength in [0, 1]")
    parser.add_argument("--boundary", choices=BOUNDARIES, default="pad")
    parser.add_argument("--out", required=True, type=Path, help="output HF checkpoint directory")
    parser.add_argument(
        "--num-cpus", type=int, help="tensor groups in flight (default: the cluster's CPUs)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.set_defaults(handler=run_consolidate)
    return parser


def run_consolidate(args: argparse.Namespace) -> int:
    """Handler of `llava-c consolidate`; user errors surface as LlavaCError."""
    from llava_c_ray.consolidate.engine import consolidate_checkpoint

    result = consolidate_checkpoint(
        args.base,
        args.out,
        tuned=args.tuned,
        adapter=args.adapter,
        method=args.method,
        alpha=args.alpha,
        boundary=args.boundary,
        num_cpus=args.num_cpus,
        overwrite=args.overwrite,
    )
    print(f"wrote {result.out} ({len(result.stats)} tensors consolidated, {result.seconds:.1f}s)")
    return 0
