"""`python -m bulk SOURCE --bundle B --out OUT`: classify every image of a folder or list into a results file.

SOURCE is a folder (its images, recursively) or a text file with one path, file:// URI or http(s):// URL per line.
OUT ends in .csv, .jsonl or .parquet (a folder of part files). Every input gets exactly one row: inputs that cannot
be read or decoded (a folder that cannot be listed included) get a row with their error and never stop the job.
A rerun skips the inputs whose rows are whole and redoes the rest, so an interrupted job (Ctrl-C, SIGTERM, a kill,
a full disk) continues where it stopped. Bulk writes only into results it wrote (its ledger, OUT.bulk.json or
_bulk.json in a Parquet folder, proves it): any other file at OUT is refused and left as it is, and so is a results
file of another model or other options. The bundle runs as in the server: PROMPTKD_BACKEND / PROMPTKD_VARIANT and
the other PROMPTKD_* session settings apply, and so do its image limits and memory budget.

Capture (opt-in, --capture-dir): a sample of the classified images is kept as the server's PROMPTKD_CAPTURE_DIR
keeps it, in the same folder layout, DIR/promptkd-capture/<model>/<version>/<day>/<time>-<id>.<ext> with a JSON
note beside each, under the same policy and bounds (the --capture-* flags, each defaulting to its PROMPTKD_CAPTURE_*
setting, else the server's default), so that a backfill feeds the next distillation as served traffic does: the
pipeline reads DIR/promptkd-capture/<model>/<version> (data.unlabelled). A drawn image is read again from its input
once its row is committed; a rerun never draws an input twice. A folder that cannot be used stops the job at start;
once the bounds are reached, images are no longer kept and classification goes on.

exit codes: 0 every input has its row; 1 the output could not be written (permissions, a full disk): rows
committed are kept, rerun to finish; 2 nothing was done (bad arguments, no inputs, an output that is not bulk's, a
bundle that cannot run); 130 interrupted: rerun to finish.
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
    parser.add_argument("--memory-budget", type=int, metavar="MIB",
                        help="MiB of decoded pixels in flight; decoding waits for room (default: "
                             "PROMPTKD_MAX_INFLIGHT_BYTES, else half the memory, at most 1024)")
    _add_capture(parser)
    ray = parser.add_argument_group("Ray (the same job on a cluster; Parquet only)")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data: decode in tasks, classify in actors")
    ray.add_argument("--ray-address", help="cluster to join, e.g. 10.0.0.5:6379 or 'auto' (default: a local one)")
    ray.add_argument("--actors", type=int, default=2, help="classifying actors, one session each (default 2)")
    ray.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs Ray reserves per actor (default 1)")
    return parser


def _add_capture(parser: argparse.ArgumentParser) -> None:
    """The server's PROMPTKD_CAPTURE_* settings as flags; an unset flag takes the setting from the environment,
    else the server's default (shown), so a job and the server it backfills for keep images alike."""
    from server.config import Settings

    def default(name: str) -> str:
        return f"default: PROMPTKD_CAPTURE_{name.upper()}, else {Settings.model_fields[f'capture_{name}'].default}"

    group = parser.add_argument_group("capture (keep a sample of the images, as the server's capture does)")
    group.add_argument("--capture-dir", type=Path, metavar="DIR",
                       help="keep images in DIR/promptkd-capture/<model>/<version>/ (off unless given; "
                            "PROMPTKD_CAPTURE_DIR alone does not turn it on)")
    group.add_argument("--capture-rate", type=float, metavar="P",
                       help=f"share of confident images kept ({default('rate')})")
    group.add_argument("--capture-below", type=float, metavar="P",
                       help=f"images whose top probability is under this are always kept ({default('below')})")
    group.add_argument("--capture-max-images", type=int, metavar="N",
                       help=f"images kept at most, the folder's earlier ones included ({default('max_images')})")
    group.add_argument("--capture-max-bytes", type=int, metavar="N",
                       help=f"bytes kept at most, images and notes ({default('max_bytes')})")
    group.add_argument("--capture-retention-days", type=float, metavar="D",
                       help=f"kept images older than this are deleted ({default('retention_days')})")
    group.add_argument("--capture-model", metavar="NAME",
                       help="<model> in the layout (default: the bundle manifest's name, as the server names "
                            "PROMPTKD_BUNDLE; in a model repository the server uses the model's folder name)")
    group.add_argument("--capture-version", type=int, default=1, metavar="N",
                       help="<version> in the layout (default 1, as the server numbers PROMPTKD_BUNDLE; in a model "
                            "repository: the version's folder number)")


class StopRequest:
    """SIGINT and SIGTERM (Ctrl-C, docker stop) ask the job to stop after the batch it is writing, so that a row is
    never cut by the signal; a second signal stops it at once (what was committed is still kept)."""

    def __init__(self, at_once: bool = False) -> None:
        self.requested = at_once  # a Ray job has no batch of its own to finish: its parts are settled on a rerun
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this batch (signal again to stop at once)", file=sys.stderr)

    def __call__(self) -> bool:
        return self.requested


def _check(args: argparse.Namespace) -> str:
    """The output format, once the numbers are sane; BulkError otherwise."""
    from .sources import BulkError
    from .writers import format_of

    for name in ("top_k", "batch_size", "actors", "decode_threads", "memory_budget"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise BulkError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    fmt = format_of(args.out, args.format)
    if args.ray and fmt != "parquet":
        raise BulkError("--ray writes Parquet: give an --out ending in .parquet (or --format parquet)")
    _check_capture(args)
    return fmt


def _check_capture(args: argparse.Namespace) -> None:
    """The --capture-* numbers in the server's ranges, each said in one line; BulkError otherwise."""
    from .sources import BulkError

    if args.capture_dir is not None and args.ray:
        raise BulkError("--capture-dir runs with the local job only, not with --ray")
    for name in ("rate", "below"):
        value = getattr(args, f"capture_{name}")
        if value is not None and not 0 <= value <= 1:
            raise BulkError(f"--capture-{name} must be between 0 and 1, got {value}")
    for name in ("max_images", "max_bytes", "version"):
        value = getattr(args, f"capture_{name}")
        if value is not None and value < 1:
            raise BulkError(f"--capture-{name.replace('_', '-')} must be at least 1, got {value}")
    if args.capture_retention_days is not None and not args.capture_retention_days > 0:
        raise BulkError(f"--capture-retention-days must be more than 0, got {args.capture_retention_days}")


def _settings(args: argparse.Namespace):
    from server.config import Settings

    from .sources import BulkError

    overrides = {"decode_threads": args.decode_threads} if args.decode_threads else {}
    overrides |= {f"capture_{name}": value for name in ("rate", "below", "max_images", "max_bytes", "retention_days")
                  if (value := getattr(args, f"capture_{name}")) is not None}
    settings = Settings(bundle=args.bundle, capture_dir=args.capture_dir, **overrides)  # only the flag turns it on
    if args.memory_budget:
        if args.memory_budget << 20 < 2 * settings.max_upload_bytes:  # an input's bytes and their copy fit
            raise BulkError(f"--memory-budget must be at least {2 * settings.max_upload_bytes >> 20} MiB: twice "
                            f"the largest input (PROMPTKD_MAX_UPLOAD_BYTES, {settings.max_upload_bytes >> 20} MiB)")
        settings = settings.model_copy(update={"max_inflight_bytes": args.memory_budget << 20})
    return settings


def _open(settings):
    """The classifier, any failure to open the bundle's graph (a corrupt file whose checksum was updated too)
    reported as the bundle's fault, not a traceback."""
    from bundle import BundleError

    from .job import open_classifier
    from .sources import BulkError

    try:
        return open_classifier(settings)
    except BundleError:
        raise
    except Exception as err:  # onnxruntime / OpenVINO / TensorRT refusing the graph
        raise BulkError(f"the bundle's graph cannot be run: {type(err).__name__}: {str(err)[:500]}") from None


def _run_local(args, fmt: str, settings, inputs, options, stop) -> dict:
    from tqdm import tqdm

    from .job import decode_budget, identity, run_local
    from .writers import open_writer

    classifier = _open(settings)
    budget = decode_budget(settings)
    capture = _capture(args, settings, classifier, budget)  # before any output: a folder it cannot use stops it
    writer = open_writer(args.out, fmt, identity(classifier.bundle, options, classifier.variant))
    with tqdm(total=len(inputs.names), initial=sum(uri in writer.done for uri in inputs.names), unit="img",
              desc="classify", disable=None) as bar:
        outcome = run_local(inputs, settings, writer, options, classifier, bar, stop, capture, budget)
    summary = {"images": outcome.images, "errors": outcome.errors, "skipped": outcome.skipped,
               "seconds": round(outcome.seconds, 2), "images_per_second": round(outcome.images_per_second, 1),
               "out": str(args.out)}
    if capture is not None:
        summary["capture"] = capture.summary()
    return summary


def _capture(args, settings, classifier, budget):
    """The job's capture under the server's policy (settings.capture_*), or None when --capture-dir is not given."""
    if settings.capture_dir is None:
        return None
    from .capture import BulkCapture

    return BulkCapture(settings.capture_dir, args.capture_model or classifier.bundle.manifest.name,
                       args.capture_version, settings.capture_rate, settings.capture_below,
                       settings.capture_max_images, settings.capture_max_bytes, settings.capture_retention_days,
                       budget)


def _run_ray(args, settings, inputs, options) -> dict:
    from bundle import read_bundle

    from .job import identity
    from .ray_job import run_ray
    from .writers import ParquetWriter

    writer = ParquetWriter(args.out, identity(read_bundle(settings.bundle), options, settings.variant))
    try:
        todo = [uri for uri in inputs.names if uri not in writer.done]
        if todo:
            staging = writer.staging()
            run_ray(todo, inputs.unreadable, settings, staging, options, args.ray_address, args.actors,
                    args.cpus_per_actor)
            writer.adopt(staging)
    finally:
        writer.close()
    return {"images": len(todo), "skipped": len(inputs.names) - len(todo), "out": str(args.out)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stop = StopRequest(at_once=args.ray)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bundle import BundleError
    from server.budget import return_freed_memory

    return_freed_memory()  # before the decoding threads start: the budget bounds the peak only if freed memory returns

    from .job import Options
    from .sources import BulkError, list_inputs

    try:
        fmt = _check(args)
        settings = _settings(args)
        inputs = list_inputs(args.source)
        if not inputs.names:
            raise BulkError(f"no images in {args.source}")
        options = Options(top_k=args.top_k, embedding=args.embedding, batch_size=args.batch_size)
        summary = (_run_ray(args, settings, inputs, options) if args.ray
                   else _run_local(args, fmt, settings, inputs, options, stop))
    except (BulkError, BundleError, ValidationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the output cannot be written: permissions, a full disk, a read-only folder
        print(f"error: {err}; rows committed so far are kept: rerun the same command to finish", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue; rows written so far are kept", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    return 0
