"""The bulk job on a Ray cluster (Ray Data): the input list as a dataset, decoding in tasks, classification in an
actor pool holding one session per actor, Parquet written by the workers. Same rows as the local job.

Ray retries what a lost worker was doing: decode tasks are retried, and the actors are restarted (max_restarts)
with their batches retried (max_task_retries), a few times each, so a node that dies mid-job does not fail it
while a batch that kills every worker it lands on does. Every node reads the bundle and the inputs at the same
paths and writes its Parquet parts under the same folder: a shared filesystem (NFS, a PVC mounted on every pod).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bundle import InputSpec, read_bundle
from server.config import Settings

from .job import Options, batch_size, classify, decode_budget, load_or_known, open_classifier
from .writers import parquet_schema

# What an actor needs to open the same session as the server would (the rest of Settings is the HTTP server's).
SESSION_FIELDS = ("bundle", "backend", "variant", "providers", "startup_check", "intra_op_threads")
RETRIES = 4


def decode_batch(batch: dict[str, np.ndarray], spec: InputSpec, settings: Settings,
                 unreadable: dict[str, str]) -> dict[str, np.ndarray]:
    """A Ray task: inputs -> model arrays (zeros where the input failed) and the error texts ('' when none), as
    the local job decodes them."""
    size = spec.image_size
    pixels = np.zeros((len(batch["path"]), 3, size, size), dtype=np.float32)
    errors = []
    budget = decode_budget(settings)
    for i, uri in enumerate(batch["path"]):
        loaded = load_or_known(str(uri), spec, settings, budget, unreadable)
        if isinstance(loaded, str):
            errors.append(loaded)
        else:
            pixels[i] = loaded
            errors.append("")
    return {"path": batch["path"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class ClassifyActor:
    """One session per actor, opened once (the server's choice and start-up check), then batch after batch."""

    def __init__(self, session: dict, options: Options) -> None:
        self.classifier = open_classifier(Settings(**session))
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        loaded = [str(err) if err else pixels for pixels, err in zip(batch["pixels"], batch["error"])]
        paths = [str(p) for p in batch["path"]]
        step = batch_size(self.classifier, len(paths))
        rows = [row for start in range(0, len(paths), step)
                for row in classify(self.classifier, paths[start:start + step], loaded[start:start + step],
                                    self.options)]
        return pa.Table.from_pylist(rows, schema=parquet_schema())


def run_ray(todo: list[str], unreadable: dict[str, str], settings: Settings, out: Path, options: Options,
            address: str | None, actors: int, cpus_per_actor: float) -> None:
    """Classify `todo` on the cluster at `address` (None: a local one started for this job), into Parquet parts
    under `out` (a staging folder the local ParquetWriter then adopts)."""
    import ray

    ray.init(address=address, log_to_driver=False, include_dashboard=False)
    try:
        bundle = read_bundle(settings.bundle.resolve())  # verified once here; each actor verifies its own
        session = {name: getattr(settings, name) for name in SESSION_FIELDS} | {"bundle": str(bundle.folder)}
        if settings.intra_op_threads == 0:  # one thread per reserved CPU, not one per core of the node
            session["intra_op_threads"] = max(1, int(cpus_per_actor))
        dataset = ray.data.from_items([{"path": uri} for uri in todo])
        decoded = dataset.map_batches(decode_batch, batch_size=options.batch_size, max_retries=RETRIES,
                                      fn_kwargs={"spec": bundle.manifest.input, "settings": settings,
                                                 "unreadable": unreadable})
        classified = decoded.map_batches(
            ClassifyActor, batch_size=options.batch_size, fn_constructor_kwargs={"session": session,
                                                                                 "options": options},
            compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
            max_restarts=RETRIES, max_task_retries=RETRIES,
        )
        classified.write_parquet(str(out.resolve()))
    finally:
        ray.shutdown()
