"""The models being served: every loaded version, how a request finds one, and how versions come and go.

A version is loaded beside the ones serving (bundle checks, graph choice and start-up check off the event loop,
then a warm-up through its own batcher) and takes traffic only once all of that passed; then the model's default
switches to it in one assignment. A request takes its version once, when it starts, and holds a lease on it, so a
version that is replaced or unloaded leaves the routing at once but finishes its requests before its batcher
stops. A version that fails is reported (UNAVAILABLE, with the reason) and never takes traffic; it is tried again
only when its folder changes or a load call names it.

Which versions serve follows the model's policy (layout.py) and the operator's calls: a load call naming a
version loads it whatever the policy and makes it the default until the next load call (rollback); an unload call
takes versions out until a load call brings them back (a version the policy pins cannot be unloaded).
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bundle import BundleError, read_bundle

from ..config import Settings
from ..errors import RequestError
from ..loop.drift import DriftMonitor
from ..loop.rollout_state import RolloutStates
from ..metrics import Metrics
from ..numbers import version_number
from ..runtime.batcher import EngineGate, MicroBatcher
from ..runtime.sessions.choice import open_session
from .backbones import Backbones, DomainBatcher
from .classifier import Classifier
from .layout import (
    MODEL_NAME, ModelConfig, ModelFolder, VersionFolder, model_names, read_entry, single_bundle,
)
from .routing import RolloutRouting
from .served import LOADING, READY, UNAVAILABLE, UNLOADING, Model, Served, Status

log = logging.getLogger("promptkd.server")
HOST_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"]+/)+")  # the folders of an absolute path: /srv/x/ in /srv/x/y


class Models(RolloutRouting):
    """Every model of the repository (or the one bundle), loaded, polled and routed to."""

    def __init__(self, settings: Settings, metrics: Metrics, gate: EngineGate) -> None:
        self.settings, self.metrics, self.gate = settings, metrics, gate
        self.root = settings.model_repository
        self.models: dict[str, Model] = {}
        self.backbones = Backbones(self.root, settings, metrics, gate)
        self.states = RolloutStates(settings.rollout_state)
        self._poll: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()  # drains, and rollout decisions being applied
        self._saving: set[asyncio.Task] = set()  # rollout state saves: awaited, never cancelled, at stop

    async def start(self) -> None:
        """Load what the repository (or the bundle) holds. A single bundle that cannot serve stops the server, as
        before; in a repository each model stands alone, and only an unreadable repository folder stops it."""
        if self.root is None:
            folders = single_bundle(self.settings.bundle)
            await self._sync(list(folders), folders.__getitem__)
            model = next(iter(self.models.values()))
            if model.default is None:
                raise BundleError(model.status[1].reason)
            return
        if not self.root.is_dir():
            raise BundleError(f"PROMPTKD_MODEL_REPOSITORY {self.root} is not a folder")
        await self.refresh()
        if self.settings.repository_poll_s > 0:
            self._poll = asyncio.create_task(self._poll_loop())

    async def stop(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
        for task in list(self._retiring):
            task.cancel()
        for model in self.models.values():
            if model.rollout is not None and model.rollout.timer is not None:
                model.rollout.timer.cancel()
            for served in model.served.values():
                await served.batcher.stop()
        await self.backbones.stop()
        await asyncio.gather(*self._saving, return_exceptions=True)  # decisions taken reach the disk first
        await asyncio.to_thread(self.states.close)

    async def refresh(self) -> None:
        """List the repository's model folders and bring every model in line with its folder."""
        names = await asyncio.to_thread(model_names, self.root)
        await self._sync(names, lambda name: read_entry(self.root / name))

    async def _sync(self, names: list[str], read: Callable[[str], ModelFolder]) -> None:
        """Bring the models named in line with their folders, and unload the others. Each folder is read under its
        model's lock: a load call may have changed it meanwhile, and an older view must never undo that call."""
        for name in [name for name in self.models if name not in names]:
            model = self.models[name]
            async with model.lock:
                if self.root is not None and (self.root / name).is_dir():
                    continue  # back (or loaded by a call) since the scan
                self.models.pop(name, None)
                self._end_rollout(model)
                model.default = None
                for version in list(model.served):
                    self._retire(model, version, "its model folder was removed")
            log.info("model %s: folder removed, unloaded", name)
        for name in names:
            model = self.models.setdefault(name, Model(ModelFolder(name, ModelConfig())))
            async with model.lock:
                try:
                    model.folder = await asyncio.to_thread(read, name)
                    await self._reconcile(model)
                except Exception as err:  # noqa: BLE001 - one model's failure is that model's alone
                    log.exception("model %s: its folder could not be brought in line; serving what is loaded", name)
                    model.folder = ModelFolder(name, model.folder.config, model.folder.versions,
                                               error=f"{type(err).__name__}: {str(err)[:300]}")

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.refresh()
            except OSError as err:
                log.warning("cannot scan the model repository %s: %s; serving what is loaded", self.root, err)
            except Exception:  # the poll must outlive any one bad scan
                log.exception("scanning the model repository failed; serving what is loaded")

    # -- what serves -------------------------------------------------------------------------------------------

    async def _reconcile(self, model: Model) -> None:
        """Load what the policy and the calls want (newest first), then switch the default, then retire the rest."""
        folder = model.folder
        if folder.error:
            if folder.error != model.reported:
                log.warning("model %s: %s", model.name, folder.error)
            model.reported = folder.error
            return  # what is loaded keeps serving, calls' choices kept; nothing new loads until the folder is fixed
        model.reported = None
        for version in [v for v in model.status if v not in folder.versions and v not in model.served]:
            del model.status[version]
        model.held &= set(folder.versions)
        model.forced &= set(folder.versions)
        policy = folder.config.version_policy
        keep: set[int] = set()
        for version in sorted(folder.versions, reverse=True):
            if version in model.held or (policy.specific is not None and version not in policy.specific):
                continue
            refusal = self._refused(model, version)
            if refusal is not None and version not in model.forced:
                if version not in model.served:  # refused by its rollout: not loaded again until its files change
                    self._set_status(model, version, Status(UNAVAILABLE, refusal.reason))
                continue
            if policy.keep is not None and len(keep) >= policy.keep:
                break
            if await self._ensure(model, folder.versions[version]):
                keep.add(version)
        for version in sorted(model.forced - keep):
            if await self._ensure(model, folder.versions[version]):
                keep.add(version)
        ready = {v for v in keep if v in model.served}
        if folder.config.rollout is None or model.pinned_default is not None:
            self._end_rollout(model)
            model.default = model.served[model.pinned_default] if model.pinned_default in ready else (
                model.served[max(ready)] if ready else None)
        else:
            keep = await self._roll(model, folder.config.rollout, keep)
        for version in [v for v in model.served if v not in keep]:
            self._retire(model, version, self._not_served(model, version))

    def _not_served(self, model: Model, version: int) -> str:
        refusal = self._refused(model, version)
        if refusal is not None:
            return refusal.reason
        policy = model.folder.config.version_policy
        return ("unloaded by request" if version in model.held else
                "its folder was removed" if version not in model.folder.versions else
                f"not served: the version policy ({policy.describe()}) serves others")

    async def _ensure(self, model: Model, folder: VersionFolder) -> bool:
        """Whether this version serves, loading it when it is new or changed; a failure is recorded, not raised.
        Contents rewritten in place that fail leave the files loaded before serving."""
        version = folder.version
        served, status = model.served.get(version), model.status.get(version)
        if served is not None and served.fingerprint == folder.fingerprint:
            return True
        if status is not None and status.failed == folder.fingerprint:
            return served is not None  # failed as it is now: tried again when it changes or a load call names it
        if served is None:
            self._set_status(model, version, Status(LOADING, "loading"))
        try:
            loaded = await self._load(model.name, folder)
        except Exception as err:  # whatever the bundle or runtime raised, this version alone fails
            log.warning("model %s version %d cannot serve: %s", model.name, version, str(err) or type(err).__name__)
            reason = self._public(str(err) or type(err).__name__, folder.path,
                                  f"{model.name}/{version}" if self.root is not None else folder.path.name)
            if served is not None:
                self._set_status(model, version, Status(READY, f"serving the files loaded before; the folder's new "
                                                               f"contents cannot serve: {reason}", folder.fingerprint))
                return True
            self._set_status(model, version, Status(UNAVAILABLE, reason, folder.fingerprint))
            return False
        model.served[version] = loaded
        if served is not None:  # the folder was rewritten in place: the new files replace the loaded ones
            if model.default is served:
                model.default = loaded
            self._retire(model, version, "replaced by its folder's new contents", served)
        self._set_status(model, version, Status(READY, loaded.classifier.choice.reason))
        log.info("model %s version %d ready: %s graph, %s", model.name, version, loaded.classifier.variant,
                 loaded.classifier.session.description)
        return True

    async def _load(self, name: str, folder: VersionFolder) -> Served:
        """Open and check the bundle off the event loop (a domain bundle: on its shared backbone), then warm its
        batcher up at batch 1 and at full batch (a shared backbone's engine once, with its first domain)."""
        labels = {"model": name, "version": str(folder.version)}
        bundle = await asyncio.to_thread(read_bundle, folder.path)
        if bundle.manifest.backbone is None:
            classifier = await asyncio.to_thread(Classifier, bundle, await asyncio.to_thread(
                open_session, bundle, self.settings))
            max_batch = min(self.settings.max_batch_size, classifier.session.max_batch or self.settings.max_batch_size)
            batcher: MicroBatcher | DomainBatcher = MicroBatcher(
                classifier.features, max_batch, self.settings.max_wait_ms, self.settings.max_queue_images,
                self.metrics, self.gate, labels)
            batcher.start()
        else:
            choice, batcher = await self.backbones.open(bundle, labels)
            try:
                classifier = await asyncio.to_thread(Classifier, bundle, choice)
            except BaseException:
                await batcher.stop()
                raise
        await self._warm_up(batcher, bundle.manifest.input.image_size)
        self.metrics.forget(name, str(folder.version))  # a replaced instance's series, if any
        self.metrics.record_choice(name, str(folder.version), classifier.choice)
        drift = (DriftMonitor(bundle.drift, self.settings.drift_window)
                 if bundle.drift is not None and self.settings.drift_window > 0 else None)
        served = Served(name, folder.version, folder.fingerprint, classifier, batcher, drift)
        served.idle.set()
        return served

    @staticmethod
    async def _warm_up(batcher: MicroBatcher | DomainBatcher, size: int) -> None:
        """Run batch 1 and a full batch before the first request (a shared engine once, with its first domain)."""
        if isinstance(batcher, DomainBatcher) and batcher.engine.warmed:
            return
        try:
            for count in sorted({1, batcher.max_batch}):
                await batcher.submit(np.zeros((count, 3, size, size), dtype=np.float32))
        except BaseException as err:
            await batcher.stop()
            if not isinstance(err, Exception):
                raise
            raise RuntimeError(f"warm-up failed: the engine cannot run a batch: {err}") from err
        if isinstance(batcher, DomainBatcher):
            batcher.engine.warmed = True

    def _retire(self, model: Model, version: int, reason: str, served: Served | None = None) -> None:
        """Out of the routing now; its batcher stops once the requests that hold it are answered."""
        served = served or model.served.pop(version)
        if model.default is served:
            model.default = None
        self._set_status(model, version, Status(UNLOADING, reason))

        async def drain() -> None:
            await served.idle.wait()
            await served.batcher.stop()
            close = getattr(served.classifier.session, "close", None)
            if close is not None:  # a TensorRT session's device buffers are not freed by the collector
                close()
            if version in model.served:
                return  # replaced by a new instance of the same version, which keeps its status and series
            self.metrics.forget(model.name, str(version))
            if model.status.get(version, Status(READY)).state == UNLOADING:
                self._set_status(model, version, Status(UNAVAILABLE, reason))  # loadable again
            log.info("model %s version %d unloaded (%s)", model.name, version, reason)

        task = asyncio.create_task(drain())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _set_status(self, model: Model, version: int, status: Status) -> None:
        model.status[version] = status
        self.metrics.record_state(model.name, str(version), status.state)

    def _public(self, message: str, folder: Path | None = None, name: str = "") -> str:
        """Reasons are shown to clients: a version's own folder (wherever a link leads) is told by `name`, paths
        inside the repository relative to it, and any other absolute path of this host by its file name alone."""
        known = {} if folder is None else {f"{p}/": f"{name}/" for p in (folder.resolve(), folder.absolute(), folder)}
        if self.root is not None:
            known |= {f"{p}/": "" for p in (self.root.resolve(), self.root.absolute(), self.root)}
        for prefix in sorted(known, key=len, reverse=True):
            message = message.replace(prefix, known[prefix])
        return HOST_PATH.sub("", message)

    # -- requests ----------------------------------------------------------------------------------------------

    def resolve(self, name: str | None, version: str | None) -> Served:
        """The version a request runs on: the named one, or the model's default; the model may be left out when
        there is only one. RequestError (400, 404, 503) says what is wrong."""
        model = self.model(name)
        if version is None:
            if model.default is None:
                raise RequestError(503, f"model {model.name!r} has no version ready: {self._why(model)}",
                                   {"Retry-After": "5"})
            return model.default
        served = model.served.get(requested_version(version))
        if served is None:
            ready = ", ".join(map(str, sorted(model.served))) or "none"
            raise RequestError(404, f"model {model.name!r} has no version {version!r} ready (ready: {ready})")
        return served

    def model(self, name: str | None) -> Model:
        if name is None:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            raise RequestError(400, f"this server serves several models: name one with ?model= (one of "
                                    f"{', '.join(sorted(self.models)) or 'none'})")
        model = self.models.get(name)
        if model is None:
            raise RequestError(404, f"unknown model {name!r}; this server serves "
                                    f"{', '.join(map(repr, sorted(self.models))) or 'no model'}")
        return model

    def _why(self, model: Model) -> str:
        if model.folder.error:
            return self._public(model.folder.error)
        if not model.folder.versions:
            return "its folder has no version folders (1/, 2/, ...)"
        return "; ".join(f"version {v}: {s.state.lower()} ({s.reason})" for v, s in sorted(model.status.items())) \
            or "nothing loaded"

    @property
    def ready(self) -> bool:
        return any(model.default is not None for model in self.models.values())

    def health_failure(self) -> str | None:
        """A serving version whose batch worker died: only a restart helps."""
        for model in self.models.values():
            for served in model.served.values():
                if not served.batcher.alive:
                    return f"the inference worker of model {model.name} version {served.version} has stopped"
        return None

    # -- the repository extension ------------------------------------------------------------------------------

    def index(self) -> list[dict]:
        """Every model and version known, with its state and why (Triton's repository index)."""
        entries = []
        for name, model in sorted(self.models.items()):
            policy = model.folder.config.version_policy
            versions = sorted(set(model.folder.versions) | set(model.status) | set(policy.specific or ()))
            if model.folder.error or not versions:
                entries.append({"name": name, "state": UNAVAILABLE, "reason": self._why(model)})
            for version in versions:
                status = model.status.get(version)
                if status is None:
                    reason = ("no version folder" if version not in model.folder.versions else
                              "unloaded by request" if version in model.held else
                              f"not loaded: the version policy ({policy.describe()}) serves newer versions")
                    status = Status(UNAVAILABLE, reason)
                entries.append({"name": name, "version": str(version), "state": status.state,
                                "reason": status.reason, **self._rollout_entry(model, version)})
        return entries

    async def load(self, name: str, version: int | None) -> None:
        """Read the model's folder again and load what it should serve; with a version, that version whatever
        the policy, as the default until the next load call (a rollback). RequestError when it cannot serve; a
        version that fails to load changes nothing of what serves."""
        model = self.models.get(name) or self.models.setdefault(name, Model(await self._rescan(name)))
        async with model.lock:
            model.folder = folder = await self._rescan(name)
            if folder.error:
                raise RequestError(400, f"failed to load {name!r}: {folder.error}")
            if version is None:
                model.held.clear()
                model.forced.clear()
                model.pinned_default = None
            else:
                if version not in folder.versions:
                    raise RequestError(404, f"model {name!r} has no version folder {version}")
                if version in model.status:
                    model.status[version].failed = None  # a load call retries a version that failed
                if not await self._ensure(model, folder.versions[version]):
                    raise RequestError(400, f"failed to load {name!r} version {version}: "
                                            f"{model.status[version].reason}")
                model.held.discard(version)
                if self.states.get(name).refused.pop(version, None) is not None:  # the operator overrides
                    self._save(name)
                model.forced = {version}
                model.pinned_default = version
            await self._reconcile(model)
        if model.default is None:
            raise RequestError(400, f"failed to load {name!r}: {self._why(model)}")

    async def unload(self, name: str, version: int | None) -> None:
        """Take a version (or every version) out of service until a load call; refused for pinned versions."""
        model = self.model(name)
        async with model.lock:
            policy = model.folder.config.version_policy
            versions = [version] if version is not None else sorted(set(model.folder.versions) | set(model.served))
            if version is not None and version not in model.folder.versions and version not in model.served:
                raise RequestError(404, f"model {name!r} has no version {version}")
            pinned = [v for v in versions if policy.pinned(v)]
            if pinned:
                raise RequestError(409, f"model {name!r}: version(s) {pinned} are pinned by its version policy "
                                        f"({policy.describe()}); change the policy to stop serving them")
            model.held.update(versions)
            model.forced.difference_update(versions)
            if model.pinned_default in versions:
                model.pinned_default = None
            await self._reconcile(model)

    async def _rescan(self, name: str) -> ModelFolder:
        if self.root is None:
            try:
                single = single_bundle(self.settings.bundle)
            except BundleError as err:
                raise RequestError(400, f"failed to load {name!r}: {err}") from None
            if name not in single:
                raise RequestError(404, f"unknown model {name!r}; this server serves {next(iter(single))!r}")
            return single[name]
        path = self.root / name
        if not MODEL_NAME.fullmatch(name) or not path.is_dir():
            raise RequestError(404, f"no model folder {name!r} in the repository")
        return await asyncio.to_thread(read_entry, path)


def requested_version(text: str) -> int:
    """A version as a request names it; RequestError 400 unless it is 1 to 10 ASCII digits."""
    number = version_number(text)
    if number is None:
        raise RequestError(400, "a version is a number of 1 to 10 ASCII digits")
    return number
