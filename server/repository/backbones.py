"""Shared backbones: each distinct student tower of the repository loaded once, serving every domain bundle on it.

A domain bundle (bundle/domain.py) names its backbone by sha256; the backbone lives in `<repository>/_backbones/
<sha256>/`. Each backbone graph (fp32 or a variant) that some domain serves with is one `Engine`: one session and
one batcher, whose batches mix requests of every domain on it, each row with its own domain's prompts. The domain's
projector and ranking run per request on the rows it gets back (`DomainBatcher`), with its own class vectors.

Which graph a domain serves with is chosen as for a folded bundle (runtime/sessions/choice.py): the configured
variant, or the fastest that passed parity for this domain at export and passes its start-up check here on the
domain's own parity set, fp32 last. Domains that end on the same graph share one engine; it is closed when its last
domain goes.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bundle import BACKBONE_MANIFEST, Backbone, Bundle, BundleError, Head, backbone_folder, check_fits, read_backbone

from ..config import Settings
from ..metrics import Metrics
from ..runtime.batcher import EngineGate, MicroBatcher, Overloaded
from ..runtime.sessions.choice import (
    Choice, Session, StartupCheck, auto_candidates, open_runtime, refuse_misplaced, verify,
)
from .layout import fingerprint

log = logging.getLogger("promptkd.server")


@dataclass
class Engine:
    """One loaded backbone graph and the batcher every domain on it shares."""

    key: tuple[str, str, str]  # backbone sha256, variant, the graph file's sha256
    variant: str
    session: Session
    batcher: MicroBatcher
    users: int = 0
    warmed: bool = False

    @property
    def sha256(self) -> str:
        return self.key[0]

    @property
    def labels(self) -> dict[str, str]:
        return engine_labels(self.sha256, self.variant)


def engine_labels(sha256: str, variant: str) -> dict[str, str]:
    """An engine's metric labels: its batches and queue are the backbone's, not one domain's."""
    return {"model": f"backbone-{sha256[:12]}", "version": variant}


class DomainSession:
    """A domain on an engine, as a session: images in, the domain's features out (its prompts on every row, its
    projector after). What start-up checks and the classifier's graph check run."""

    def __init__(self, engine: Engine, prompts: np.ndarray, head: Head, feature_dim: int) -> None:
        self.engine, self.prompts, self.head = engine, prompts, head
        self.max_batch = engine.session.max_batch
        self.input_shape = engine.session.input_shape
        self.output_shape = ["batch", feature_dim]
        self.extra_shapes: list = []
        self.description = f"shared backbone {engine.sha256[:12]} ({engine.session.description})"

    def rows(self, count: int) -> np.ndarray:
        return np.broadcast_to(self.prompts, (count, *self.prompts.shape))

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.head(self.engine.session.run(batch, self.rows(len(batch))))


class DomainBatcher:
    """A domain's handle on its engine's shared batcher: what a served version submits to and stops. Each domain
    keeps its own bound on waiting images (PROMPTKD_MAX_QUEUE_IMAGES, as a folded model's queue has), so that one
    flooded domain cannot make the others on its backbone answer 503."""

    def __init__(self, session: DomainSession, labels: dict[str, str], max_queue: int,
                 release: Callable[[Engine], Awaitable[None]]) -> None:
        self.session, self.labels, self.max_queue, self._release = session, labels, max_queue, release
        self.engine = session.engine
        self.max_batch = self.engine.batcher.max_batch
        self.queued_images = 0
        self.shadow_images = 0
        self._stopped = False

    @property
    def alive(self) -> bool:
        return self.engine.batcher.alive

    def coming(self, images: int):
        """Images being decoded for this domain: its engine's batch waits for them (batcher.MicroBatcher.coming)."""
        return self.engine.batcher.coming(images)

    async def submit(self, images: np.ndarray, *, shadow: bool = False, limit: int | None = None,
                     timing: list[float] | None = None) -> np.ndarray:
        """The domain's features; a shadow copy (loop/rollout.py) counts against this domain's own `limit`."""
        count = len(images)
        if shadow:
            if limit is not None and self.shadow_images and self.shadow_images + count > limit:
                raise Overloaded(f"{self.shadow_images} shadow images of this model are already waiting (limit "
                                 f"{limit})")
            self.shadow_images += count
        else:
            if self.queued_images + count > self.max_queue:
                raise Overloaded(f"{self.queued_images} images of this model are already waiting (limit "
                                 f"{self.max_queue})")
            self.queued_images += count
        try:
            pooled = await self.engine.batcher.submit(images, self.session.rows(count), shadow=shadow, timing=timing)
        finally:
            if shadow:
                self.shadow_images -= count
            else:
                self.queued_images -= count
        return self.session.head(pooled)

    async def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            await self._release(self.engine)


class Backbones:
    """The repository's backbones: read and verified once per folder state, each graph loaded once."""

    def __init__(self, root: Path | None, settings: Settings, metrics: Metrics, gate: EngineGate) -> None:
        self.root, self.settings, self.metrics, self.gate = root, settings, metrics, gate
        self.engines: dict[tuple[str, str, str], Engine] = {}
        self._read: dict[str, tuple[str, Backbone]] = {}  # sha256 -> (folder fingerprint, verified backbone)
        self._lock = asyncio.Lock()

    async def open(self, bundle: Bundle, labels: dict[str, str]) -> tuple[Choice, DomainBatcher]:
        """The graph this domain serves with, checked on its parity set, and its handle on that graph's engine.
        BundleError when its backbone is missing or does not fit, or (configured variant) its check fails."""
        backbone = await self._backbone(bundle)
        if self.settings.backend == "tensorrt":
            raise BundleError("a shared backbone runs on onnxruntime or OpenVINO: export/to_trt.py builds engines of "
                              "folded bundles only (set PROMPTKD_BACKEND=auto for domain bundles)")
        open_graph, on_gpu = open_runtime(self.settings)
        explicit = self.settings.variant != "auto"
        checks: list[StartupCheck] = []
        have = backbone.manifest.variants
        for name in [self.settings.variant] if explicit else [*auto_candidates(bundle, on_gpu), "fp32"]:
            variant = bundle.manifest.variants.get(name)
            if name != "fp32" and (variant is None or name not in have):
                if not explicit:
                    continue  # measured at export on a backbone graph this backbone folder no longer has
                raise BundleError(f"the domain has no {name!r} variant that passed its parity on this backbone (it "
                                  f"has: {', '.join(['fp32', *(v for v in bundle.manifest.variants if v in have)])})")
            if variant is not None:
                refuse_misplaced(name, variant, on_gpu)
            engine = await self._acquire(backbone, name, open_graph)
            session = DomainSession(engine, bundle.prompts, bundle.head, bundle.manifest.feature_dim)
            try:
                verdict = ("the shared graph in fp32, the reference every variant is checked against"
                           if variant is None else
                           await asyncio.to_thread(verify, session, bundle, name, variant, self.settings, explicit,
                                                   checks))
            except BaseException:
                await self.release(engine)
                raise
            if verdict:
                verdict = f"PROMPTKD_VARIANT={name}; {verdict}" if explicit else verdict
                handle = DomainBatcher(session, labels, self.settings.max_queue_images, self.release)
                return Choice(session, name, verdict, checks), handle
            await self.release(engine)
        raise AssertionError("fp32 is always accepted")

    async def _backbone(self, bundle: Bundle) -> Backbone:
        """The domain's backbone, verified (checksums once per folder state) and fitting its prompts and input."""
        ref = bundle.manifest.backbone
        if self.root is None:
            raise BundleError("a domain bundle runs on a shared backbone: serve it from a model repository "
                              "(PROMPTKD_MODEL_REPOSITORY) that holds _backbones/<sha256>/")
        folder = backbone_folder(self.root, ref.sha256)
        if not folder.is_dir():
            raise BundleError(f"backbone {ref.sha256} is not in the repository (no _backbones/{ref.sha256}/): export "
                              "a domain of that student tower with python -m export domain --repository, or copy the "
                              "backbone folder from the repository it was exported to")
        async with self._lock:
            state = await asyncio.to_thread(fingerprint, folder, BACKBONE_MANIFEST)
            known = self._read.get(ref.sha256)
            if known is None or known[0] != state:
                self._read[ref.sha256] = known = (state, await asyncio.to_thread(read_backbone, folder))
        backbone = known[1]
        check_fits(backbone.manifest, ref)
        if backbone.manifest.input != bundle.manifest.input:
            raise BundleError(f"the domain's input ({bundle.manifest.input}) is not its backbone's "
                              f"({backbone.manifest.input})")
        return backbone

    async def _acquire(self, backbone: Backbone, variant: str,
                       open_graph: Callable[[bytes, str], Session]) -> Engine:
        """The engine of this graph (a rewritten graph file is another engine), one more domain on it; the graph is
        loaded from the bytes of the file verified against that sha256, read in the worker thread."""
        key = (backbone.manifest.sha256, variant, backbone.manifest.files[backbone.graph_role(variant)].sha256)
        async with self._lock:
            engine = self.engines.get(key)
            if engine is None:
                session = await asyncio.to_thread(
                    lambda: open_graph(backbone.graph_bytes(variant), str(backbone.model_path(variant))))
                if len(session.extra_shapes) != 1:
                    raise BundleError(f"backbone {key[0][:12]} {variant} graph does not take prompts as an input")
                max_batch = min(self.settings.max_batch_size, session.max_batch or self.settings.max_batch_size)
                batcher = MicroBatcher(session.run, max_batch, self.settings.max_wait_ms,
                                       self.settings.max_queue_images, self.metrics, self.gate,
                                       engine_labels(*key[:2]))
                batcher.start()
                engine = Engine(key, variant, session, batcher)
                self.engines[key] = engine
                log.info("backbone %s: %s graph loaded with %s", key[0][:12], variant, session.description)
            engine.users += 1
            engine.batcher.max_queue = self.settings.max_queue_images * engine.users  # each domain its own bound
            return engine

    async def release(self, engine: Engine) -> None:
        """One domain less on the engine; the last one's going stops its batcher and frees its session."""
        async with self._lock:
            engine.users -= 1
            engine.batcher.max_queue = self.settings.max_queue_images * max(1, engine.users)
            if engine.users > 0 or self.engines.get(engine.key) is not engine:
                return
            del self.engines[engine.key]
        await engine.batcher.stop()
        self.metrics.forget(*engine.labels.values())
        log.info("backbone %s: %s graph unloaded (no domain serves with it)", engine.sha256[:12], engine.variant)

    async def stop(self) -> None:
        for engine in list(self.engines.values()):
            await engine.batcher.stop()
        self.engines.clear()
