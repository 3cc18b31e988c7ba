"""Safe rollout's cost to the version serving: shadow off against a 20% and a 100% shadow sample, in one run.

    python bench/rollout.py [--bundle DIR] [--concurrency 1 32] [--windows 3] [--window-s 10] [--out bench/results]

Without --bundle it builds a ViT-B/16 student bundle with random weights (bench/load.py's, by the project's export).
Three real uvicorn servers on loopback, each on its own model repository and with bench/load.py's settings (one
engine slot, the same threads, max batch and queue): "off" serves version 1 alone; the others serve the same
version 1 with version 2 (the same bundle's bytes, so both cost the same) as a rollout candidate in shadow, with
`rollout: {shadow_sample: S, decide: external, shadow_queue_images: Q}` in model.yaml (external: the server only
measures, so the candidate stays in shadow for the whole run). Clients post real JPEGs (foolbox's ImageNet photos)
as fast as the server answers. For each concurrency, time windows alternate between the servers (off, 20%, 100%,
off, ...), one server loaded at a time, so that the machine's drift hits all alike; after each window the
candidate's shadow backlog is left to run out before the next window starts, so it is counted in its own window
and never runs beside another server's.

Per configuration and concurrency: the serving version's images/s, latency p50/p99 (pooled over the windows),
errors, and the ratios to shadow off (targets: throughput at least 0.95x, p99 at most 1.1x). For the shadow
configurations, from the server's own /metrics (promptkd_rollout_images_total) over its windows: "compared / sampled"
is compared / copied, the share of the sampled copies the candidate actually ran (the rest were dropped: its shadow
queue was full, as shadow work only runs in the pauses of the serving traffic), and "compared / served" is compared
images over images answered, the share of the traffic effectively measured (at most the sample). After each shadow
window the server is left until every copy it made was compared or dropped (the window's end is a pause), so that
no shadow work runs during another server's window.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import foolbox_photos, load_level, percentiles_ms, random_bundle, start_server  # noqa: E402

MODEL = "bench"
OUTCOMES = ("copied", "compared", "agreed", "dropped")
DRAIN_LIMIT_S = 300  # a backlog that never runs out (a copy failing is counted as an error, not an image)
TARGET_THROUGHPUT, TARGET_P99 = 0.95, 1.1


def copy_bundle(bundle: Path, target: Path) -> None:
    """The bundle's bytes as a version folder: hard links where the file system allows (a ViT-B/16 bundle is large)."""
    def link(source: str, destination: str) -> None:
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)

    shutil.copytree(bundle, target, copy_function=link)


def repository(root: Path, bundle: Path, sample: float | None, queue: int) -> Path:
    """Version 1 alone (sample None), or versions 1 and 2 (the same bundle) with a shadow rollout of `sample`."""
    copy_bundle(bundle, root / MODEL / "1")
    if sample is not None:
        copy_bundle(bundle, root / MODEL / "2")
        (root / MODEL / "model.yaml").write_text(
            f"rollout:\n  shadow_sample: {sample}\n  decide: external\n  shadow_queue_images: {queue}\n")
    return root


def entries(url: str) -> dict[str, dict]:
    """The repository index of the benchmark's model, by version."""
    found = httpx.post(f"{url}/v2/repository/index", json={}, timeout=10).json()
    return {e.get("version"): e for e in found if e.get("name") == MODEL}


def wait_for_shadow(url: str, server, shadow: bool) -> None:
    """Version 1 serving and, with a rollout, version 2 loaded as its candidate in shadow: /readyz only says that
    some version is ready, and the candidate may still be loading."""
    for _ in range(1200):
        if server.poll() is not None:
            sys.exit("error: a server exited while loading")
        found = entries(url)
        ready = found.get("1", {}).get("state") == "READY"
        candidate = found.get("2", {})
        if ready and (not shadow or (candidate.get("state") == "READY"
                                     and (candidate.get("rollout") or {}).get("stage") == "shadow")):
            return
        time.sleep(0.5)
    sys.exit(f"error: the rollout did not start: {entries(url)}")


def scrape(url: str) -> dict[str, float]:
    """The rollout's image counters, from the server's /metrics."""
    got = dict.fromkeys(OUTCOMES, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("promptkd_rollout_images_total{"):
            outcome = re.search(r'outcome="(\w+)"', line)
            if outcome and outcome.group(1) in OUTCOMES:
                got[outcome.group(1)] += float(line.split()[-1])
    return got


def drain(url: str, before: dict[str, float]) -> dict[str, float]:
    """Wait until every copy made since `before` was compared or dropped: copies wait for a pause in the traffic
    (the window's end is one), and must run before the next server's window, never beside it."""
    deadline = time.perf_counter() + DRAIN_LIMIT_S
    while True:
        now = scrape(url)
        done = (now["compared"] - before["compared"]) + (now["dropped"] - before["dropped"])
        if done >= now["copied"] - before["copied"] or time.perf_counter() > deadline:
            return now
        time.sleep(0.1)


def window(url: str, data: list[bytes], concurrency: int, seconds: float, shadow: bool) -> dict:
    """One time window of load on one server, with the rollout counters it added, its shadow backlog included
    (the server was left drained by its previous window)."""
    before = scrape(url)
    part = asyncio.run(load_level(url, data, concurrency, 10**9, seconds=seconds))
    after = drain(url, before) if shadow else scrape(url)
    return part | {k: after[k] - before[k] for k in OUTCOMES}


def pooled(name: str, sample: float | None, parts: list[dict]) -> dict:
    """One configuration's windows together: throughput over their summed wall time, percentiles over all
    latencies."""
    wall = sum(p["wall_s"] for p in parts)
    served = sum(p["requests"] - p["errors"] for p in parts)
    row = {"config": name, "sample": sample, "windows": len(parts), "requests": sum(p["requests"] for p in parts),
           "images_per_s": served / wall, **percentiles_ms([s for p in parts for s in p["latencies_s"]]),
           "errors": sum(p["errors"] for p in parts), "server_errors": sum(p["server_errors"] for p in parts)}
    if sample is not None:
        counts = {k: int(sum(p[k] for p in parts)) for k in OUTCOMES}
        row |= counts | {"compared_of_sampled": counts["compared"] / counts["copied"] if counts["copied"] else None,
                         "compared_of_served": counts["compared"] / served if served else None}
    return row


def measure(servers: dict[str, tuple], samples: dict[str, float | None], data: list[bytes], concurrency: int,
            args) -> dict:
    """One concurrency level: `args.windows` rounds of one window per server in turn, then the ratios to off."""
    parts: dict[str, list[dict]] = {name: [] for name in servers}
    for _ in range(args.windows):
        for name, (_, url) in servers.items():
            parts[name].append(window(url, data, concurrency, args.window_s, samples[name] is not None))
    rows = {name: pooled(name, samples[name], runs) for name, runs in parts.items()}
    off = rows["off"]
    for row in rows.values():
        row["throughput_ratio"] = row["images_per_s"] / off["images_per_s"]
        row["p99_ratio"] = row["p99_ms"] / off["p99_ms"]
        row["meets_targets"] = row["throughput_ratio"] >= TARGET_THROUGHPUT and row["p99_ratio"] <= TARGET_P99
    print(f"concurrency {concurrency}: " + ", ".join(f"{n} {r['images_per_s']:.2f} img/s" for n, r in rows.items()),
          file=sys.stderr, flush=True)
    return {"concurrency": concurrency, "configs": rows}


def launch(bundle: Path, samples: dict[str, float | None], data: list[bytes], tmp: Path, args) -> dict[str, tuple]:
    """One server per configuration, each on its own repository, loaded one after the other and warmed up."""
    servers: dict[str, tuple] = {}
    try:
        for name, sample in samples.items():
            root = repository(tmp / f"repo-{name.rstrip('%')}", bundle, sample, args.shadow_queue_images)
            servers[name] = start_server(None, args, model_repository=str(root))
            wait_for_shadow(servers[name][1], servers[name][0], sample is not None)
        for name, (_, url) in servers.items():  # first runs (allocations, connections) outside the windows
            window(url, data, max(args.concurrency), args.warmup_s, samples[name] is not None)
    except BaseException:
        stop(servers)
        raise
    return servers


def stop(servers: dict[str, tuple]) -> None:
    """Terminate them all first, then wait: they shut down side by side."""
    for server, _ in servers.values():
        server.terminate()
    for server, _ in servers.values():
        server.wait(timeout=60)


def report(rows: list[dict], served: dict, stages: dict[str, str | None], args) -> None:
    """The table on stdout and rollout.json in --out (load.py's convention: one file per benchmark)."""
    name = args.bundle.name if args.bundle else f"{args.student_model} (random weights)"
    print(f"\nserving version 1 of {name}, {served.get('variant')} on {served.get('runtime')}, candidate version 2 the "
          f"same bundle in shadow (shadow queue {args.shadow_queue_images} images), max batch "
          f"{args.max_batch_size}, {os.cpu_count()} CPUs, {args.windows} window(s) of {args.window_s:g} s per "
          f"configuration and concurrency, real JPEGs over loopback\n")
    print("| concurrency | shadow | requests | img/s | p50 ms | p99 ms | errors | img/s vs off | p99 vs off | "
          "compared / sampled | compared / served |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for level in rows:
        for r in level["configs"].values():
            shares = ("- | -" if r["sample"] is None else
                      f"{share(r['compared_of_sampled'])} | {share(r['compared_of_served'])}")
            print(f"| {level['concurrency']} | {r['config']} | {r['requests']} | {r['images_per_s']:.2f} | "
                  f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | {r['throughput_ratio']:.3f} | "
                  f"{r['p99_ratio']:.3f} | {shares} |")
    met = all(r["meets_targets"] for level in rows for r in level["configs"].values())
    print(f"\ntargets (img/s at least {TARGET_THROUGHPUT}x off, p99 at most {TARGET_P99}x, every level): "
          f"{'met' if met else 'NOT met'}; candidate stage at the end: {stages}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rollout.json").write_text(json.dumps(
        {"served": f"{served.get('variant')} on {served.get('runtime')}", "max_batch_size": args.max_batch_size,
         "windows": args.windows, "window_s": args.window_s, "shadow_queue_images": args.shadow_queue_images,
         "cpus": os.cpu_count(), "targets_met": met, "stages_at_end": stages, "rows": rows}, indent=2))


def share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle both versions serve (default: a random ViT-B/16 bundle)")
    parser.add_argument("--student-model", default="ViT-B-16", help="architecture of the random bundle")
    parser.add_argument("--feature-dim", type=int, default=768, help="class-vector width of the random bundle")
    parser.add_argument("--variants", nargs="*", default=["int8", "int8_vnni"], help="variants of the random bundle")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="client counts")
    parser.add_argument("--samples", type=float, nargs="+", default=[0.2, 1.0], help="shadow samples besides off")
    parser.add_argument("--windows", type=int, default=3, help="windows per configuration and concurrency")
    parser.add_argument("--window-s", type=float, default=10.0, help="seconds of load per window")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="unmeasured load per server before the windows")
    parser.add_argument("--shadow-queue-images", type=int, default=32, help="shadow_queue_images of the rollouts")
    parser.add_argument("--max-batch-size", type=int, default=8, help="PROMPTKD_MAX_BATCH_SIZE of the servers")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per batch (0: all cores)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for rollout.json")
    args = parser.parse_args()

    samples: dict[str, float | None] = {"off": None} | {f"{s:.0%}": s for s in args.samples}
    photos = foolbox_photos()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or random_bundle(Path(tmp), args.student_model, args.feature_dim, photos, args.variants)
        data = [p.read_bytes() for p in photos]
        servers = launch(bundle, samples, data, Path(tmp), args)
        try:
            rows = [measure(servers, samples, data, concurrency, args) for concurrency in args.concurrency]
            served = httpx.get(servers["off"][1], timeout=10).json()
            stages = {name: (entries(url).get("2", {}).get("rollout") or {}).get("stage")
                      for name, (_, url) in servers.items() if samples[name] is not None}
        finally:
            stop(servers)
    report(rows, served, stages, args)


if __name__ == "__main__":
    main()
