"""One model against several in one server: throughput, latency and memory, side by side in one run.

    python bench/models.py [--models 4] [--concurrency 32] [--student-model ViT-B-16] [--out bench/results]

Two real uvicorn servers on loopback, both with the same engine count (PROMPTKD_ENGINE_SLOTS=1, the same threads):
one serves a repository of one model, the other a repository of N models (each a separately loaded copy of the same
random-weight student bundle, as N domains' students would be). Clients post real JPEGs; against the N-model server
request i goes to model i mod N (a mixed load). Windows alternate between the two servers so that the machine's
drift hits both alike. Memory is each server's resident set (VmRSS) once loaded and after the load.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import REPO, foolbox_photos, free_port, load_level, random_bundle  # noqa: E402


def repository(root: Path, bundle: Path, count: int) -> Path:
    """`count` models, each version 1 of its own name, each loaded separately by the server."""
    for i in range(count):
        (root / f"domain{i}").mkdir(parents=True)
        (root / f"domain{i}" / "1").symlink_to(bundle.resolve(), target_is_directory=True)
    return root


def start(root: Path, args, **settings: str) -> tuple[subprocess.Popen, str]:
    """A server of the repository `root`, with further PROMPTKD_* `settings`."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTKD_")}
    env.update({f"PROMPTKD_{k.upper()}": v for k, v in settings.items()})
    env.update(PROMPTKD_MODEL_REPOSITORY=str(root), PROMPTKD_ENGINE_SLOTS="1",
               PROMPTKD_MAX_BATCH_SIZE=str(args.max_batch_size), PROMPTKD_INTRA_OP_THREADS=str(args.threads),
               PROMPTKD_MAX_QUEUE_IMAGES=str(4 * args.concurrency), PROMPTKD_REQUEST_TIMEOUT_S="600",
               PROMPTKD_GRPC_PORT="0")  # servers side by side, measured over HTTP: no gRPC port to share
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "server.main:app", "--port", str(port),
                               "--log-level", "warning"], cwd=REPO, env=env)
    return server, f"http://127.0.0.1:{port}"


def wait_ready(server: subprocess.Popen, url: str, models: int) -> None:
    for _ in range(1200):
        if server.poll() is not None:
            sys.exit("error: a server exited while loading")
        try:
            ready = httpx.post(f"{url}/v2/repository/index", json={"ready": True}, timeout=2).json()
            if len(ready) == models:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    sys.exit("error: a server did not load its models")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(servers: dict[int, tuple[subprocess.Popen, str]], photos: list[bytes], args) -> dict[int, dict]:
    """Alternating windows of each server under the same concurrency; figures pooled over the rounds."""
    parts: dict[int, list[dict]] = {count: [] for count in servers}
    for share in np.array_split(np.arange(args.requests), args.rounds):
        for count, (_, url) in servers.items():
            names = [f"domain{i}" for i in range(count)]
            parts[count].append(asyncio.run(load_level(url, photos, args.concurrency, len(share), names)))
    rows = {}
    for count, runs in parts.items():
        wall = sum(p["wall_s"] for p in runs)
        rows[count] = {"models": count, "requests": sum(p["requests"] for p in runs),
                       "images_per_s": sum(p["requests"] - p["errors"] for p in runs) / wall,
                       "p50_ms": statistics.median(p["p50_ms"] for p in runs),
                       "p99_ms": max(p["p99_ms"] for p in runs), "errors": sum(p["errors"] for p in runs)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle each model serves (default: a random student bundle)")
    parser.add_argument("--student-model", default="ViT-B-16", help="architecture of the random bundle")
    parser.add_argument("--feature-dim", type=int, default=768, help="class-vector width of the random bundle")
    parser.add_argument("--models", type=int, default=4, help="models in the second server")
    parser.add_argument("--concurrency", type=int, default=32, help="clients")
    parser.add_argument("--requests", type=int, default=192, help="requests per server, over all rounds")
    parser.add_argument("--rounds", type=int, default=3, help="alternations between the two servers")
    parser.add_argument("--max-batch-size", type=int, default=8, help="PROMPTKD_MAX_BATCH_SIZE of both servers")
    parser.add_argument("--threads", type=int, default=0, help="runtime threads per batch (0: all cores)")
    parser.add_argument("--variants", nargs="*", default=[], help="variants of the random bundle")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for models.json")
    args = parser.parse_args()

    photos = foolbox_photos()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or random_bundle(Path(tmp), args.student_model, args.feature_dim, photos, args.variants)
        servers = {count: start(repository(Path(tmp) / f"repo{count}", bundle, count), args)
                   for count in (1, args.models)}
        try:
            for count, (server, url) in servers.items():
                wait_ready(server, url, count)
            loaded = {count: rss_mib(server.pid) for count, (server, _) in servers.items()}
            rows = measure(servers, [p.read_bytes() for p in photos], args)
            for count, (server, _) in servers.items():
                rows[count].update(rss_loaded_mib=loaded[count], rss_after_mib=rss_mib(server.pid))
            served = httpx.get(servers[1][1], timeout=10).json()
        finally:
            for server, _ in servers.values():
                server.terminate()
                server.wait(timeout=60)
    report(rows, served, args)


def report(rows: dict[int, dict], served: dict, args) -> None:
    one, many = rows[1], rows[args.models]
    per_model = (many["rss_loaded_mib"] - one["rss_loaded_mib"]) / max(1, args.models - 1)
    name = args.bundle.name if args.bundle else f"{args.student_model} (random weights)"
    print(f"\n{name}, {served['variant']} on {served['runtime']}, engine slots 1, max batch {args.max_batch_size}, "
          f"concurrency {args.concurrency}, {os.cpu_count()} CPUs, real JPEGs over loopback\n")
    print("| models | requests | img/s | p50 ms | p99 ms | errors | RSS loaded MiB | RSS after MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows.values():
        print(f"| {r['models']} | {r['requests']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
              f"{r['errors']} | {r['rss_loaded_mib']:.0f} | {r['rss_after_mib']:.0f} |")
    print(f"\n{args.models} models / 1: throughput {many['images_per_s'] / one['images_per_s']:.2f}x, "
          f"p99 {many['p99_ms'] / one['p99_ms']:.2f}x; each extra model {per_model:.0f} MiB resident")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "models.json").write_text(json.dumps({"served": f"{served['variant']} on {served['runtime']}",
                                                      "per_model_mib": per_model, "rows": list(rows.values())},
                                                     indent=2))


if __name__ == "__main__":
    main()
