"""`python -m bulk SOURCE --bundle B --out OUT`: classify every image of a folder or list into a results file.

SOURCE is a folder (its images, recursively) or a text file with one path, file:// URI or http(s):// URL per line.
OUT ends in .csv, .jsonl or .parquet (a folder of part files). A rerun skips the inputs OUT already holds, so an
interrupted job continues where it stopped. Inputs that cannot be read or decoded get a row with their error and
never stop the job. The bundle runs as in the server: PROMPTKD_BACKEND / PROMPTKD_VARIANT and the other PROMPTKD_*
session settings apply, and so do its image limits.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from pydantic import ValidationError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bulk", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="folder of images, or a list file (one path or URI per line)")
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    parser.add_argument("--out", type=Path, required=True, help="results: .csv, .jsonl or .parquet (a folder)")
    parser.add_argument("--format", choices=("csv", "jsonl", "parquet"), help="default: from --out's suffix")
    parser.add_argument("--top-k", type=int, default=5, help="labels per image (default 5)")
    parser.add_argument("--embedding", action="store_true", help="also write each image's embedding")
    parser.add_argument("--batch-size", type=int, default=8, help="images per engine run (default 8)")
    parser.add_argument("--decode-threads", type=int, help="decoding threads (default: available cores)")
    ray = parser.add_argument_group("Ray (the same job on a cluster; Parquet only)")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data: decode in tasks, classify in actors")
    ray.add_argument("--ray-address", help="cluster to join, e.g. 10.0.0.5:6379 or 'auto' (default: a local one)")
    ray.add_argument("--actors", type=int, default=2, help="classifying actors, one session each (default 2)")
    ray.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs Ray reserves per actor (default 1)")
    return parser


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)  # docker stop, kill: stop like Ctrl-C, keeping the rows written
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bundle import BundleError
    from server.config import Settings

    from .job import Options, run_local
    from .sources import BulkError, list_inputs
    from .writers import format_of, open_writer, read_done_parquet

    try:
        for name in ("top_k", "batch_size", "actors", "decode_threads"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise BulkError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        fmt = format_of(args.out, args.format)
        if args.ray and fmt != "parquet":
            raise BulkError("--ray writes Parquet: give an --out ending in .parquet (or --format parquet)")
        overrides = {"decode_threads": args.decode_threads} if args.decode_threads else {}
        settings = Settings(bundle=args.bundle, **overrides)
        inputs = list_inputs(args.source)
        if not inputs:
            raise BulkError(f"no images in {args.source}")
        options = Options(top_k=args.top_k, embedding=args.embedding, batch_size=args.batch_size)
        if args.ray:
            from .ray_job import run_ray

            done = read_done_parquet(args.out) if args.out.is_dir() else set()
            todo = [uri for uri in inputs if uri not in done]
            if todo:
                run_ray(todo, settings, args.out, options, args.ray_address, args.actors, args.cpus_per_actor)
            summary = {"images": len(todo), "skipped": len(inputs) - len(todo), "out": str(args.out)}
        else:
            from tqdm import tqdm

            writer = open_writer(args.out, fmt)
            with tqdm(total=len(inputs), initial=sum(uri in writer.done for uri in inputs), unit="img",
                      desc="classify", disable=None) as bar:
                outcome = run_local(inputs, settings, writer, options, bar)
            summary = {"images": outcome.images, "errors": outcome.errors, "skipped": outcome.skipped,
                       "seconds": round(outcome.seconds, 2), "images_per_second": round(outcome.images_per_second, 1),
                       "out": str(args.out)}
    except (BulkError, BundleError, ValidationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the output cannot be written: a folder in the way, permissions, a full disk
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue; rows written so far are kept", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0
