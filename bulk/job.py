"""Classify many stored images with a bundle, on one machine: the server's session, decoding and ranking, without
HTTP. Decoding runs on a thread pool a few batches ahead of the engine (at a lower priority, as in the server), so
the engine rarely waits; every input gets a row, a failed one with its error, and nothing stops the job. Decoding
draws on the server's memory budget (PROMPTKD_MAX_INFLIGHT_BYTES), waiting for room rather than being refused, so
the job's peak stays near its idle size plus the budget whatever the images."""
from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bundle import Bundle, InputSpec
from server.budget import MemoryBudget, OverBudget
from server.repository.classifier import Classifier, Vocabulary
from server.config import Settings
from server.runtime.preprocess import ImageError, prepare, yield_to_the_engine

from .ledger import Identity
from .sources import Inputs, read_input
from .writers import Writer

if TYPE_CHECKING:
    from .capture import BulkCapture

PREFETCH_BATCHES = 4


@dataclass
class Options:
    top_k: int = 5
    embedding: bool = False
    batch_size: int = 8


def open_classifier(settings: Settings) -> Classifier:
    """The server's choice of graph and runtime for this machine, start-up check included."""
    return Classifier.open(settings.bundle, settings)


def identity(bundle: Bundle, options: Options, variant: str) -> Identity:
    """What answers this job's rows: the model, its version (the manifest's digest, which covers every file's
    sha256), its labels and class vectors, the graph variant, and the options that shape a row."""
    manifest = bundle.manifest
    vocabulary = Vocabulary.build(bundle.labels, bundle.class_vectors, manifest.feature_dim, "bundle")
    version = hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()[:16]
    return Identity(manifest.name, version, vocabulary.version, variant, options.top_k, options.embedding)


def decode_budget(settings: Settings) -> MemoryBudget:
    return MemoryBudget(settings.max_inflight_bytes, wait=True)


def load(uri: str, spec: InputSpec, settings: Settings, budget: MemoryBudget | None = None) -> np.ndarray | str:
    """One input as the model's input array, or its error as text: whatever goes wrong with one input (a bad URL,
    a broken connection, a corrupt file, an image larger than the whole memory budget) is that input's row, never
    the job's end."""
    try:
        data = read_input(uri, settings.max_upload_bytes)
        return prepare(data, spec, settings.max_image_pixels, settings.formats(), budget)
    except ImageError as err:
        return f"{err.status}: {err}"
    except OverBudget as err:
        return f"over the memory budget: {err} (a larger --memory-budget into a new --out classifies it)"
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    except Exception as err:  # anything else about one input (http.client's errors, bad URLs) is still its own
        return f"unreadable: {type(err).__name__}: {err}"


def _text(error: str) -> str:
    """An error as text every format holds: a file name's undecodable bytes (surrogates) escaped."""
    return error.encode("utf-8", "backslashreplace").decode("utf-8")


def batch_size(classifier: Classifier, wanted: int) -> int:
    """At most what the engine takes (a TensorRT engine's profile has a maximum batch)."""
    return min(wanted, classifier.session.max_batch or wanted)


def classify(classifier: Classifier, uris: list[str], loaded: list[np.ndarray | str], options: Options) -> list[dict]:
    """Rows for one batch: the decoded inputs run through the engine together, the others keep their error."""
    good = [i for i, item in enumerate(loaded) if isinstance(item, np.ndarray)]
    rows = [{"path": uri, "labels": [], "probabilities": [], "embedding": None,
             "error": _text(item) if isinstance(item, str) else None} for uri, item in zip(uris, loaded)]
    if good:
        features = classifier.features(np.stack([loaded[i] for i in good]))
        vocabulary = classifier.vocabulary
        ranked = classifier.top_k(classifier.probabilities(features, vocabulary), options.top_k)
        for i, rank, feature in zip(good, ranked, features):
            rows[i]["labels"] = [vocabulary.labels[j] for j in rank.indices]
            rows[i]["probabilities"] = [round(float(p), 6) for p in rank.probabilities]
            if options.embedding:
                rows[i]["embedding"] = [float(x) for x in feature]
    return rows


def batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class Outcome:
    images: int
    errors: int
    skipped: int  # already written by an earlier run
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def run_local(inputs: Inputs, settings: Settings, writer: Writer, options: Options, classifier: Classifier,
              progress=None, stop: Callable[[], bool] = lambda: False, capture: BulkCapture | None = None,
              budget: MemoryBudget | None = None) -> Outcome:
    """Classify every input not yet written, in order, writing each batch's rows as it finishes, then offering them
    to `capture` (after the commit: a rerun never draws an image twice); KeyboardInterrupt after the batch during
    which `stop()` turned true. `budget`: the job's one memory budget, shared with the capture's re-encoding."""
    todo = [uri for uri in inputs.names if uri not in writer.done]
    size, spec = batch_size(classifier, options.batch_size), classifier.bundle.manifest.input
    errors = 0
    started = time.perf_counter()
    budget = budget or decode_budget(settings)
    try:
        with ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode",
                                initializer=yield_to_the_engine) as pool:
            for uris, futures in _ahead(batches(todo, size), pool, spec, settings, inputs.unreadable, budget):
                rows = classify(classifier, uris, [f.result() for f in futures], options)
                writer.write(rows)
                if capture is not None:
                    capture.consider(rows, settings.max_upload_bytes)
                errors += sum(row["error"] is not None for row in rows)
                if progress is not None:
                    progress.update(len(rows))
                if stop():
                    raise KeyboardInterrupt
    finally:
        writer.close()  # what was classified is kept, also on an interrupt
    return Outcome(len(todo), errors, len(inputs.names) - len(todo), time.perf_counter() - started)


def load_or_known(uri: str, spec: InputSpec, settings: Settings, budget: MemoryBudget,
                  unreadable: dict[str, str]) -> np.ndarray | str:
    """An input's array, or its error: known already for a folder that could not be listed."""
    return unreadable[uri] if uri in unreadable else load(uri, spec, settings, budget)


def _ahead(chunks: Iterable[list[str]], pool: ThreadPoolExecutor, spec: InputSpec, settings: Settings,
           unreadable: dict[str, str], budget: MemoryBudget) -> Iterator[tuple[list[str], list[Future]]]:
    """Batches with their decoding submitted up to PREFETCH_BATCHES ahead, so memory stays bounded."""
    queue: deque[tuple[list[str], list[Future]]] = deque()
    for uris in chunks:
        queue.append((uris, [pool.submit(load_or_known, uri, spec, settings, budget, unreadable) for uri in uris]))
        if len(queue) > PREFETCH_BATCHES:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
