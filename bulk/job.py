"""Classify many stored images with a bundle, on one machine: the server's session, decoding and ranking, without
HTTP. Decoding runs on a thread pool a few batches ahead of the engine (at a lower priority, as in the server), so
the engine rarely waits; every input gets a row, a failed one with its error, and nothing stops the job."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bundle import InputSpec
from server.classifier import Classifier
from server.config import Settings
from server.preprocess import ImageError, prepare, yield_to_the_engine

from .sources import read_input
from .writers import Writer

PREFETCH_BATCHES = 4


@dataclass
class Options:
    top_k: int = 5
    embedding: bool = False
    batch_size: int = 8


def open_classifier(settings: Settings) -> Classifier:
    """The server's choice of graph and runtime for this machine, start-up check included."""
    return Classifier.open(settings.bundle, settings)


def load(uri: str, spec: InputSpec, settings: Settings) -> np.ndarray | str:
    """One input as the model's input array, or its error as text: whatever goes wrong with one input (a bad URL,
    a broken connection, a corrupt file) is that input's row, never the job's end."""
    try:
        return prepare(read_input(uri, settings.max_upload_bytes), spec, settings.max_image_pixels, settings.formats())
    except ImageError as err:
        return f"{err.status}: {err}"
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    except Exception as err:  # anything else about one input (http.client's errors, bad URLs) is still its own
        return f"unreadable: {type(err).__name__}: {err}"


def batch_size(classifier: Classifier, wanted: int) -> int:
    """At most what the engine takes (a TensorRT engine's profile has a maximum batch)."""
    return min(wanted, classifier.session.max_batch or wanted)


def classify(classifier: Classifier, uris: list[str], loaded: list[np.ndarray | str], options: Options) -> list[dict]:
    """Rows for one batch: the decoded inputs run through the engine together, the others keep their error."""
    good = [i for i, item in enumerate(loaded) if isinstance(item, np.ndarray)]
    rows = [{"path": uri, "labels": [], "probabilities": [], "embedding": None, "error": item if isinstance(item, str)
             else None} for uri, item in zip(uris, loaded)]
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


def run_local(inputs: list[str], settings: Settings, writer: Writer, options: Options, progress=None,
              classifier: Classifier | None = None) -> Outcome:
    """Classify every input not yet written, in order, writing each batch's rows as it finishes."""
    classifier = classifier or open_classifier(settings)
    todo = [uri for uri in inputs if uri not in writer.done]
    size, spec = batch_size(classifier, options.batch_size), classifier.bundle.manifest.input
    errors = 0
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode",
                                initializer=yield_to_the_engine) as pool:
            for uris, futures in _ahead(batches(todo, size), pool, spec, settings):
                rows = classify(classifier, uris, [f.result() for f in futures], options)
                writer.write(rows)
                errors += sum(row["error"] is not None for row in rows)
                if progress is not None:
                    progress.update(len(rows))
    finally:
        writer.close()  # what was classified is kept, also on an interrupt
    return Outcome(len(todo), errors, len(inputs) - len(todo), time.perf_counter() - started)


def _ahead(chunks: Iterable[list[str]], pool: ThreadPoolExecutor, spec: InputSpec,
           settings: Settings) -> Iterator[tuple[list[str], list[Future]]]:
    """Batches with their decoding submitted up to PREFETCH_BATCHES ahead, so memory stays bounded."""
    queue: deque[tuple[list[str], list[Future]]] = deque()
    for uris in chunks:
        queue.append((uris, [pool.submit(load, uri, spec, settings) for uri in uris]))
        if len(queue) > PREFETCH_BATCHES:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
