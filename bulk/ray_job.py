"""The bulk job on a Ray cluster (Ray Data): the input list as a dataset, decoding in tasks, classification in an
actor pool holding one session per actor, Parquet written by the workers. Same rows as the local job.

Ray retries what a lost worker was doing: decode tasks are retried, and the actors are restarted (max_restarts)
with their batches retried (max_task_retries), so a node that dies mid-job does not fail it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bundle import InputSpec, read_bundle
from server.config import Settings
from server.preprocess import ImageError, prepare

from .job import Options, classify, open_classifier
from .sources import read_input
from .writers import parquet_schema

# What an actor needs to open the same session as the server would (the rest of Settings is the HTTP server's).
SESSION_FIELDS = ("bundle", "backend", "variant", "providers", "startup_check", "intra_op_threads")


def decode_batch(batch: dict[str, np.ndarray], spec: dict, max_bytes: int, max_pixels: int,
                 formats: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A Ray task: inputs -> model arrays (zeros where the input failed) and the error texts ('' when none)."""
    input_spec = InputSpec(**spec)
    size = input_spec.image_size
    pixels = np.zeros((len(batch["path"]), 3, size, size), dtype=np.float32)
    errors = []
    for i, uri in enumerate(batch["path"]):
        try:
            pixels[i] = prepare(read_input(str(uri), max_bytes), input_spec, max_pixels, formats)
            errors.append("")
        except ImageError as err:
            errors.append(f"{err.status}: {err}")
        except OSError as err:
            errors.append(f"unreadable: {err.strerror or err}")
    return {"path": batch["path"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class ClassifyActor:
    """One session per actor, opened once (the server's choice and start-up check), then batch after batch."""

    def __init__(self, session: dict, options: Options) -> None:
        self.classifier = open_classifier(Settings(**session))
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        loaded = [str(err) if err else pixels for pixels, err in zip(batch["pixels"], batch["error"])]
        rows = classify(self.classifier, [str(p) for p in batch["path"]], loaded, self.options)
        return pa.Table.from_pylist(rows, schema=parquet_schema())


def run_ray(todo: list[str], settings: Settings, out: Path, options: Options, address: str | None, actors: int,
            cpus_per_actor: float) -> None:
    """Classify `todo` on the cluster at `address` (None: a local one started for this job), into Parquet parts
    under `out`."""
    import ray

    ray.init(address=address, log_to_driver=False, include_dashboard=False)
    try:
        manifest = read_bundle(settings.bundle).manifest  # verified once here; each actor verifies its own
        session = {name: getattr(settings, name) for name in SESSION_FIELDS} | {"bundle": str(settings.bundle)}
        dataset = ray.data.from_items([{"path": uri} for uri in todo])
        decoded = dataset.map_batches(
            decode_batch, batch_size=options.batch_size,
            fn_kwargs={"spec": manifest.input.model_dump(), "max_bytes": settings.max_upload_bytes,
                       "max_pixels": settings.max_image_pixels, "formats": settings.formats()},
            max_retries=-1,
        )
        classified = decoded.map_batches(
            ClassifyActor, batch_size=options.batch_size, fn_constructor_kwargs={"session": session,
                                                                                 "options": options},
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
            max_restarts=-1, max_task_retries=-1,
        )
        classified.write_parquet(str(out))
    finally:
        ray.shutdown()
