"""Bulk classification: real photos through a real bundle into CSV, JSON lines and Parquet, with per-file errors,
resume, answers equal to the server's, and the same job on a real two-node Ray cluster on loopback."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import httpx
import pytest

from conftest import foolbox_jpegs, serve_bundle, stop_server

REPO = Path(__file__).resolve().parents[1]


def bulk(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTKD_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "bulk", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=environment)


def read_rows(out: Path) -> dict[str, dict]:
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    elif out.suffix == ".csv":
        import csv

        rows = [dict(r, labels=json.loads(r["labels"]), probabilities=json.loads(r["probabilities"]),
                     error=r["error"] or None, embedding=json.loads(r["embedding"]) if r["embedding"] else None)
                for r in csv.DictReader(out.open())]
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {row["path"]: row for row in rows}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, fmnist) -> Path:
    """A list file: real Fashion-MNIST PNGs and ImageNet JPEGs, plus three inputs that must fail on their own."""
    folder = tmp_path_factory.mktemp("bulk-inputs")
    (folder / "page.jpg").write_text("<html><body>not an image</body></html>")
    (folder / "cut.png").write_bytes((fmnist / "test" / "bag").glob("*.png").__next__().read_bytes()[:60])
    photos = sorted(str(p) for p in (fmnist / "test").rglob("*.png"))[:40] + [str(p) for p in foolbox_jpegs()[:6]]
    bad = [str(folder / "page.jpg"), str(folder / "cut.png"), str(folder / "missing.png")]
    listing = folder / "inputs.txt"
    listing.write_text("# photos, then three bad inputs\n" + "\n".join(photos[:20] + bad + photos[20:]) + "\n")
    return listing


def test_rows_equal_the_server_s_answers_and_bad_inputs_get_their_own_error(bundle_dir, inputs, tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = bulk(str(inputs), "--bundle", str(bundle_dir), "--out", str(out), "--top-k", "3", "--embedding")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    listed = [ln for ln in inputs.read_text().splitlines() if ln and not ln.startswith("#")]
    assert summary["images"] == len(listed) and summary["errors"] == 3 and summary["skipped"] == 0
    rows = read_rows(out)
    assert list(rows) == listed, "one row per input, in the list's order"
    assert rows[listed[20]]["error"].startswith("415") and rows[listed[21]]["error"].startswith("400")
    assert rows[listed[22]]["error"].startswith("unreadable")
    photos = [p for p in listed if rows[p]["error"] is None]
    assert len(photos) == len(listed) - 3
    server, url = serve_bundle(bundle_dir)
    try:
        for path in photos[::5] + photos[-6:]:
            with open(path, "rb") as f:
                answer = httpx.post(f"{url}/classify", files={"file": (Path(path).name, f)}, params={"top_k": 3},
                                    timeout=30).json()["results"][0]["predictions"]
            assert rows[path]["labels"] == [p["label"] for p in answer], path
            assert rows[path]["probabilities"] == pytest.approx([p["probability"] for p in answer], abs=1e-5)
            with open(path, "rb") as f:
                embedding = httpx.post(f"{url}/embed", files={"file": (Path(path).name, f)},
                                       timeout=30).json()["results"][0]["embedding"]
            assert rows[path]["embedding"] == pytest.approx(embedding, abs=1e-5)
    finally:
        stop_server(server)


def test_every_format_holds_the_same_rows(bundle_dir, inputs, tmp_path):
    results = {}
    for name in ("rows.csv", "rows.parquet", "rows.jsonl"):
        proc = bulk(str(inputs), "--bundle", str(bundle_dir), "--out", str(tmp_path / name), "--batch-size", "5")
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[name] = read_rows(tmp_path / name)
    assert results["rows.csv"].keys() == results["rows.parquet"].keys() == results["rows.jsonl"].keys()
    for path, row in results["rows.jsonl"].items():
        for other in ("rows.csv", "rows.parquet"):
            assert results[other][path]["labels"] == row["labels"]
            assert results[other][path]["probabilities"] == pytest.approx(row["probabilities"], abs=1e-6)
            assert (results[other][path]["error"] or None) == row["error"]


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_a_rerun_skips_what_is_written_and_finishes_the_rest(bundle_dir, inputs, tmp_path, suffix):
    listed = [ln for ln in inputs.read_text().splitlines() if ln and not ln.startswith("#")]
    first = tmp_path / "first.txt"
    first.write_text("\n".join(listed[:17]))
    out = tmp_path / f"rows.{suffix}"
    assert bulk(str(first), "--bundle", str(bundle_dir), "--out", str(out)).returncode == 0
    if suffix != "parquet":
        with out.open("a") as f:
            f.write('{"path": "half a li')  # a crash in the middle of a line
    proc = bulk(str(inputs), "--bundle", str(bundle_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["skipped"] == 17 and summary["images"] == len(listed) - 17
    assert sorted(read_rows(out)) == sorted(listed)
    again = json.loads(bulk(str(inputs), "--bundle", str(bundle_dir), "--out", str(out)).stdout)
    assert again["images"] == 0 and again["skipped"] == len(listed)


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}/rows.txt"], "cannot tell the output format"),
    (["--out", "{tmp}/rows.csv", "--ray"], "--ray writes Parquet"),
    (["--out", "{tmp}/rows.csv", "--top-k", "0"], "--top-k must be at least 1"),
    (["--out", "{tmp}/rows.csv", "--bundle", "{tmp}"], "manifest"),
])
def test_bad_arguments_are_refused_with_one_line(bundle_dir, inputs, tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    bundle = [] if "--bundle" in args else ["--bundle", str(bundle_dir)]
    proc = bulk(str(inputs), *bundle, *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (tmp_path / "empty").mkdir()
    proc = bulk(str(tmp_path / "empty"), "--bundle", str(bundle_dir), "--out", str(tmp_path / "r.csv"))
    assert proc.returncode == 2 and "no images in" in proc.stderr


@pytest.mark.parametrize("name, text", [("notes.csv", "name,age\nada,36"), ("notes.jsonl", "hello"),
                                        ("log.jsonl", '{"path": "x"}\nnot json\n{"a": 1}')])
def test_a_results_file_of_something_else_is_never_changed(bundle_dir, inputs, tmp_path, name, text):
    out = tmp_path / name
    out.write_text(text)
    proc = bulk(str(inputs), "--bundle", str(bundle_dir), "--out", str(out))
    assert proc.returncode == 2 and "is not a bulk result" in proc.stderr
    assert out.read_text() == text


def test_odd_list_lines_are_rows_with_errors_not_the_end_of_the_job(bundle_dir, fmnist, tmp_path):
    photo = next((fmnist / "test").rglob("*.png"))
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    listing = tmp_path / "odd.txt"
    lines = [str(photo), "http://exa mple.invalid/a b.jpg", "s3://bucket/key.jpg", str(tmp_path), str(fifo),
             f"file://{photo}"]
    listing.write_text("\ufeff" + "\n".join(lines), encoding="utf-8")  # a byte-order mark, as editors write it
    out = tmp_path / "rows.jsonl"
    proc = bulk(str(listing), "--bundle", str(bundle_dir), "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_rows(out)
    assert list(rows) == lines
    assert rows[lines[0]]["error"] is None and rows[lines[5]]["labels"] == rows[lines[0]]["labels"]
    assert "s3:// is not read here" in rows[lines[2]]["error"]
    assert all(rows[line]["error"].startswith("unreadable") for line in lines[1:5])


RAY_CLUSTER = """\
set -euo pipefail
ip link set lo up
export RAY_USAGE_STATS_ENABLED=0 RAY_DISABLE_DOCKER_CPU_WARNING=1 HOME={home}
RAY={ray}
trap '$RAY stop --force >/dev/null 2>&1 || true' EXIT
$RAY start --head --node-ip-address 127.0.0.1 --port {port} --num-cpus 1 --disable-usage-stats \\
    --include-dashboard false --temp-dir {tmp} >/dev/null
$RAY start --address 127.0.0.1:{port} --node-ip-address 127.0.0.1 --num-cpus 2 --disable-usage-stats >/dev/null
echo "nodes up"
{python} -m bulk {inputs} --bundle {bundle} --out {out} --ray --ray-address 127.0.0.1:{port} --actors 2 \\
    --batch-size 4 > {log} 2>&1 &
JOB=$!
for i in $(seq 600); do
    if pgrep -f "MapWorker\\(MapBatches\\(ClassifyActor" >/dev/null; then break; fi
    sleep 0.1
done
sleep 2
if kill -0 $JOB 2>/dev/null && pkill -9 -f -o "MapWorker\\(MapBatches\\(ClassifyActor"; then
    echo "killed an actor while the job ran"
fi
wait $JOB
echo "job exit $?"
"""


@pytest.mark.slow
def test_the_ray_job_on_a_two_node_cluster_equals_the_local_job_and_survives_a_killed_worker(
        bundle_dir, inputs, tmp_path):
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("the Ray test runs in a loopback-only network namespace: needs root, unshare and ip")
    pytest.importorskip("ray", reason="Ray is the [ray] extra")
    listed = [ln for ln in inputs.read_text().splitlines() if ln and not ln.startswith("#")]
    many = tmp_path / "many.txt"  # enough batches that the job is still running when a worker is killed: each
    spellings = [lambda p: p, lambda p: f"file://{p}", lambda p: p.replace("/", "/./", 1),  # input six times, as
                 lambda p: p.replace("/", "//", 1), lambda p: f"file://{p.replace('/', '/./', 1)}",  # distinct names
                 lambda p: f"file://{p.replace('/', '//', 1)}"]
    many.write_text("\n".join(spell(p) for spell in spellings for p in listed))
    local = tmp_path / "local.jsonl"
    assert bulk(str(inputs), "--bundle", str(bundle_dir), "--out", str(local)).returncode == 0
    out = tmp_path / "ray.parquet"
    script = tmp_path / "cluster.sh"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay under 108 bytes
    script.write_text(textwrap.dedent(RAY_CLUSTER).format(
        home=tmp_path, ray=Path(sys.executable).parent / "ray", port=6391, tmp=ray_tmp,
        python=sys.executable, inputs=many, bundle=bundle_dir, out=out, log=tmp_path / "job.log"))
    try:
        proc = subprocess.run(["unshare", "-n", "bash", str(script)], cwd=REPO, capture_output=True, text=True,
                              timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if "Operation not permitted" in proc.stderr and "nodes up" not in proc.stdout:
        pytest.skip(f"cannot create a network namespace here: {proc.stderr.strip()[:200]}")
    log = (tmp_path / "job.log").read_text() if (tmp_path / "job.log").exists() else ""
    assert "job exit 0" in proc.stdout, proc.stdout + proc.stderr[-3000:] + log[-3000:]
    assert "killed an actor while the job ran" in proc.stdout, proc.stdout
    import pyarrow.parquet as pq

    written = pq.read_table(out).column("path").to_pylist()
    assert sorted(written) == sorted(many.read_text().split("\n")), "no row lost or doubled by the retries"
    ray_rows, local_rows = read_rows(out), read_rows(local)
    assert local_rows.keys() <= ray_rows.keys()
    for path, row in local_rows.items():
        assert ray_rows[path]["labels"] == row["labels"]
        assert ray_rows[path]["probabilities"] == pytest.approx(row["probabilities"], abs=1e-5)
        assert (ray_rows[path]["error"] or None) == row["error"]
