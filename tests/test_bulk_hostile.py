"""`python -m bulk` as a hostile user tries it: interrupted and cut results files, files of value at --out, odd
file names, formula cells, another model's results, unreadable folders, a corrupt graph, a FIFO, and images that
would blow its memory. Every case ends with exactly one whole row per input, or a refusal that changed nothing."""
import csv
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bulk import writers
from bulk.ledger import Identity
from bulk.sources import list_inputs, read_input
from bulk.writers import LineWriter, ParquetWriter, csv_cell, csv_text
from conftest import derive_bundle
from test_bulk import REPO, bulk, read_rows

IDENTITY = Identity("m", "v1", "l1", "fp32", 3, False)
FORMULAS = ["=HYPERLINK(\"http://x\")", "@SUM(A1)", "+1", "-1", "\tx", "\rx", "'quoted", "\uff1dfull"]


def photos(fmnist: Path, count: int) -> list[Path]:
    return sorted((fmnist / "test").rglob("*.png"))[:count]


def listing(tmp_path: Path, paths: list) -> Path:
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(map(str, paths)) + "\n")
    return listed


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_whole_row_each(out: Path, expected: list[str], top_k: int = 5) -> None:
    if out.suffix == ".csv":
        with out.open(encoding="utf-8", newline="") as f:
            paths = [csv_text(row["path"]) for row in csv.DictReader(f)]
    elif out.suffix == ".jsonl":
        paths = [json.loads(line)["path"] for line in out.read_text(encoding="utf-8").splitlines()]
    else:
        import pyarrow.parquet as pq

        paths = pq.read_table(out).column("path").to_pylist()
    assert sorted(paths) == sorted(expected), "exactly one row per input"
    for row in read_rows(out).values():
        assert row["error"] or len(row["labels"]) == top_k == len(row["probabilities"]), row


# --- 1. resume after a cut: in process, any cut of any file, hostile names -----------------------------------

def fake_rows(names: list[str]) -> list[dict]:
    return [{"path": n, "labels": ["a", "b", "c"], "probabilities": [0.5, 0.3, 0.2], "embedding": None,
             "error": None if i % 3 else f"400: {n[:5]} is odd"} for i, n in enumerate(names)]


NAMES = st.lists(st.one_of(st.text(min_size=1, max_size=20), st.sampled_from(FORMULAS)), min_size=1, max_size=24,
                 unique=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=NAMES, fmt=st.sampled_from(["csv", "jsonl"]), cut=st.floats(0, 1), batch=st.integers(1, 5))
def test_a_file_cut_anywhere_resumes_to_exactly_one_whole_row_per_input(tmp_path_factory, monkeypatch, names, fmt,
                                                                       cut, batch):
    monkeypatch.setattr(writers, "COMMIT_EVERY_S", 0.0)  # a commit per batch: many points to fall back to
    out = tmp_path_factory.mktemp("cut") / f"r.{fmt}"
    writer = LineWriter(out, fmt, IDENTITY)
    for start in range(0, len(names), batch):
        writer.write(fake_rows(names[start:start + batch]))
    writer.close()
    data = out.read_bytes()
    out.write_bytes(data[:int(len(data) * cut)])  # a copy cut short, a file system that lost its last writes
    writer = LineWriter(out, fmt, IDENTITY)
    assert writer.done <= set(names)
    writer.write(fake_rows([n for n in names if n not in writer.done]))
    writer.close()
    with out.open(encoding="utf-8", newline="") as f:
        if fmt == "csv":
            rows = list(csv.DictReader(f))
            written = [csv_text(r["path"]) for r in rows]
            assert all(json.loads(r["labels"]) == ["a", "b", "c"] for r in rows)
        else:
            written = [json.loads(line)["path"] for line in f]
    assert sorted(written) == sorted(names)


def test_bytes_written_after_the_last_commit_are_cut_and_redone(tmp_path, monkeypatch):
    monkeypatch.setattr(writers, "COMMIT_EVERY_S", 3600.0)  # only the forced commits: at open and close
    out = tmp_path / "r.jsonl"
    writer = LineWriter(out, "jsonl", IDENTITY)
    writer.write(fake_rows(["a", "b"]))
    os.close(writer.fd)  # killed: the rows are on disk but never committed
    with out.open("a") as f:
        f.write('{"path": "c", "labels": []')  # and half a row after them
    assert LineWriter(out, "jsonl", IDENTITY).done == set()
    assert out.read_bytes() == b""


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_job_stopped_by_a_full_disk_resumes_to_every_row(bundle_dir, fmnist, tmp_path, fmt):
    """RLIMIT_FSIZE stands in for a full disk: a write past it fails with EFBIG as it would with ENOSPC (Python
    ignores SIGXFSZ); the rerun, with room, must end with one whole row per input."""
    paths = [str(p) for p in photos(fmnist, 60)]
    out = tmp_path / f"r.{fmt}"

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4000, resource.RLIM_INFINITY))

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTKD_")}
    proc = subprocess.run([sys.executable, "-m", "bulk", str(listing(tmp_path, paths)), "--bundle", str(bundle_dir),
                           "--out", str(out), "--batch-size", "4"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env, preexec_fn=limited)
    assert proc.returncode == 1 and "File too large" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert 0 < out.stat().st_size <= 4000
    proc = bulk(str(listing(tmp_path, paths)), "--bundle", str(bundle_dir), "--out", str(out), "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_one_whole_row_each(out, paths)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_killed_job_resumes_to_every_row(bundle_dir, fmnist, tmp_path, fmt):
    paths = [str(p) for p in photos(fmnist, 400)]
    out = tmp_path / f"r.{fmt}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTKD_")}
    args = [sys.executable, "-m", "bulk", str(listing(tmp_path, paths)), "--bundle", str(bundle_dir), "--out",
            str(out), "--batch-size", "4"]
    job = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watched = out / "_bulk.json" if fmt == "parquet" else out
    while job.poll() is None and not (watched.exists() and len(list(out.parent.rglob("*"))) > 2
                                      and (fmt == "parquet" or out.stat().st_size > 3000)):
        time.sleep(0.002)
    if fmt == "parquet":  # parts are 1,024 rows: kill in the middle of gathering the first (the whole job of 400
        time.sleep(0.05)  # photos took under 0.5 s on a fast CI machine)
    job.kill()
    assert job.wait() == -signal.SIGKILL, "the job finished before it could be killed: nothing was tested"
    proc = bulk(str(listing(tmp_path, paths)), "--bundle", str(bundle_dir), "--out", str(out), "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_one_whole_row_each(out, paths)


# --- 2. files of value are never changed ---------------------------------------------------------------------

@pytest.mark.parametrize("name, content", [
    ("catalogue.jsonl", '{"path": "/photos/a.jpg", "owner": "ada"}\n{"path": "/photos/b.jpg", "owner": "bo"}\n'),
    ("people.csv", "path,labels,probabilities,embedding,error\n/x.png,[],[],,\n"),  # a bulk header, not bulk's
])
def test_a_file_bulk_did_not_write_is_refused_and_left_as_it_is(bundle_dir, fmnist, tmp_path, name, content):
    out = tmp_path / name
    out.write_text(content)
    proc = bulk(str(listing(tmp_path, photos(fmnist, 3))), "--bundle", str(bundle_dir), "--out", str(out))
    assert proc.returncode == 2 and "is not a bulk result" in proc.stderr, proc.stderr
    assert out.read_text() == content and sorted(p.name for p in tmp_path.iterdir()) == sorted(["list.txt", name])


def test_a_parquet_folder_holding_someone_s_files_is_refused_and_left_as_it_is(bundle_dir, fmnist, tmp_path):
    out = tmp_path / "sales"
    out.mkdir()
    (out / "sales.parquet").write_bytes(b"PAR1 not really")
    before = snapshot(out)
    proc = bulk(str(listing(tmp_path, photos(fmnist, 3))), "--bundle", str(bundle_dir), "--out", str(out),
                "--format", "parquet")
    assert proc.returncode == 2 and "not a bulk result" in proc.stderr, proc.stderr
    assert snapshot(out) == before
    # a file dropped into bulk's own folder later is not bulk's either: refused, never renamed
    ours = tmp_path / "ours.parquet"
    assert bulk(str(listing(tmp_path, photos(fmnist, 3))), "--bundle", str(bundle_dir), "--out",
                str(ours)).returncode == 0
    (ours / "notes.parquet").write_text("mine")
    before = snapshot(ours)
    proc = bulk(str(listing(tmp_path, photos(fmnist, 5))), "--bundle", str(bundle_dir), "--out", str(ours))
    assert proc.returncode == 2 and "notes.parquet" in proc.stderr and snapshot(ours) == before


def test_a_results_file_changed_since_bulk_wrote_it_is_refused(bundle_dir, fmnist, tmp_path):
    out = tmp_path / "r.jsonl"
    assert bulk(str(listing(tmp_path, photos(fmnist, 3))), "--bundle", str(bundle_dir), "--out",
                str(out)).returncode == 0
    text = out.read_text().replace("/", "|", 1)  # someone's edit, the same length
    out.write_text(text)
    proc = bulk(str(listing(tmp_path, photos(fmnist, 5))), "--bundle", str(bundle_dir), "--out", str(out))
    assert proc.returncode == 2 and "changed since bulk wrote it" in proc.stderr and out.read_text() == text


@pytest.mark.parametrize("kind", ["fifo", "symlink", "foreign ledger"])
def test_outputs_that_are_not_bulk_s_regular_files_are_refused_at_once(bundle_dir, fmnist, tmp_path, kind):
    out = tmp_path / "r.csv"
    target = tmp_path / "precious.csv"
    target.write_text("precious")
    if kind == "fifo":
        os.mkfifo(out)
    elif kind == "symlink":
        out.symlink_to(target)
    else:
        (tmp_path / "r.csv.bulk.json").write_text('{"mine": true}')
    proc = bulk(str(listing(tmp_path, photos(fmnist, 3))), "--bundle", str(bundle_dir), "--out", str(out),
                timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert target.read_text() == "precious"
    if kind == "foreign ledger":
        assert (tmp_path / "r.csv.bulk.json").read_text() == '{"mine": true}' and not out.exists()


# --- 3, 4. odd names and formula cells, in every format ------------------------------------------------------

@pytest.fixture
def odd_folder(fmnist, tmp_path) -> tuple[Path, list[str]]:
    """Real photos named with a non-UTF-8 byte, spreadsheet formulas and odd unicode."""
    folder = tmp_path / "odd"
    folder.mkdir()
    source = photos(fmnist, 1)[0].read_bytes()
    names = [b"bad\xff.png", b"good.png", *(f"{f[:10]}.png".replace("\r", "_r").encode() for f in FORMULAS),
             "ÿ\u202e\u200bnoël.png".encode()]
    for name in names:
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            f.write(source)
    return folder, list_inputs(folder).names


@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl"])
def test_names_that_are_not_utf8_or_are_formulas_are_written_losslessly(bundle_dir, odd_folder, tmp_path, suffix):
    folder, names = odd_folder
    out = tmp_path / f"r.{suffix}"
    proc = bulk(str(folder), "--bundle", str(bundle_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_one_whole_row_each(out, names)
    rows = read_rows(out) if suffix != "csv" else None
    uri = next(n for n in names if n.startswith("file://"))
    assert uri.endswith("/bad%FF.png") and read_input(uri, 1 << 20) == (folder / "good.png").read_bytes()
    if rows is not None:
        assert rows[uri]["error"] is None and rows[uri]["labels"]
    again = json.loads(bulk(str(folder), "--bundle", str(bundle_dir), "--out", str(out)).stdout)
    assert again["images"] == 0 and again["skipped"] == len(names), "every odd name is found again on a rerun"


def test_csv_cells_never_start_a_formula(bundle_dir, odd_folder, tmp_path):
    folder, _ = odd_folder
    listed = tmp_path / "formulas.txt"  # formulas from a list file too: rows with their error
    listed.write_text("\n".join(["=cmd|' /C calc'!A0", "@SUM(1+1)*cmd", "+1+1", "-1-1"]) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTKD_")} | {"PYTHONPATH": str(REPO)}
    for source, out in ((".", tmp_path / "folder.csv"), (str(listed), tmp_path / "list.csv")):
        proc = subprocess.run([sys.executable, "-m", "bulk", source, "--bundle", str(bundle_dir), "--out", str(out)],
                              cwd=folder, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        with out.open(encoding="utf-8", newline="") as f:
            cells = [cell for row in csv.reader(f) for cell in row]
        assert not [c for c in cells if c.startswith(("=", "+", "-", "@", "\t", "\r", "\uff1d"))], cells
        assert any(c.startswith("'=") for c in cells) and any(c.startswith("'@") for c in cells), cells
        out.read_bytes().decode("utf-8")  # valid UTF-8 throughout


@given(st.text(max_size=30))
def test_csv_cell_round_trips_and_never_starts_a_formula(text):
    cell = csv_cell(text)
    assert csv_text(cell) == text
    assert not cell.startswith(("=", "+", "-", "@", "\t", "\r", "\n"))


# --- 5. one model per results file ---------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_resuming_with_another_model_or_options_is_refused(bundle_dir, fmnist, tmp_path, suffix):
    other = derive_bundle(bundle_dir, tmp_path / "other", "other-", reverse=True)
    paths = photos(fmnist, 6)
    out = tmp_path / f"r.{suffix}"
    assert bulk(str(listing(tmp_path, paths[:3])), "--bundle", str(bundle_dir), "--out", str(out)).returncode == 0
    results = lambda: {k: v for k, v in snapshot(tmp_path).items() if k.startswith("r.")}  # noqa: E731
    before = results()
    for args, says in ((["--bundle", str(other)], "labels_version"), (["--bundle", str(bundle_dir), "--top-k", "2"],
                                                                      "top_k 5 -> 2")):
        proc = bulk(str(listing(tmp_path, paths)), *args, "--out", str(out))
        assert proc.returncode == 2 and "another model or options" in proc.stderr and says in proc.stderr, \
            proc.stderr
    assert results() == before
    ledger = json.loads((out / "_bulk.json" if suffix == "parquet" else tmp_path / "r.csv.bulk.json").read_text())
    assert ledger["identity"]["model"] and ledger["identity"]["labels_version"]


# --- 6. nothing skipped silently, no tracebacks --------------------------------------------------------------

def test_a_folder_too_deep_to_list_is_a_row_not_the_end_of_the_job(bundle_dir, fmnist, tmp_path):
    top = tmp_path / "deep"
    top.mkdir()
    photo = photos(fmnist, 1)[0].read_bytes()
    (top / "a.png").write_bytes(photo)
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(20):  # 20 x 250 characters: past PATH_MAX (4096)
            os.mkdir("d" * 250, dir_fd=fd)
            fd, old = os.open("d" * 250, os.O_RDONLY, dir_fd=fd), fd
            os.close(old)
        with open(os.open("deepest.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "wb") as f:
            f.write(photo)
    finally:
        os.close(fd)
    out = tmp_path / "r.jsonl"
    proc = bulk(str(top), "--bundle", str(bundle_dir), "--out", str(out))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    rows = read_rows(out)
    assert rows[str(top / "a.png")]["error"] is None
    failed = [row for row in rows.values() if row["error"]]
    assert len(failed) == 1 and "unreadable folder" in failed[0]["error"], rows
    assert json.loads(proc.stdout)["errors"] == 1


def test_an_unreadable_subfolder_is_a_row_with_its_error(bundle_dir, fmnist, tmp_path):
    """A subfolder the job may not list; root reads everything, so as root the job runs without the capabilities
    that let it (setpriv)."""
    import shutil

    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: permissions cannot be denied")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    root = tmp_path / "photos"
    (root / "locked").mkdir(parents=True)
    for i, photo in enumerate(photos(fmnist, 2)):
        shutil.copy(photo, root / ("locked" if i else ".") / photo.name)
    os.chmod(root / "locked", 0o000)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTKD_")}
        proc = subprocess.run([*prefix, sys.executable, "-m", "bulk", str(root), "--bundle", str(bundle_dir),
                               "--out", str(tmp_path / "r.jsonl")], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env=env)
    finally:
        os.chmod(root / "locked", 0o755)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_rows(tmp_path / "r.jsonl")
    assert rows[str(root / "locked")]["error"] == "unreadable folder: Permission denied"
    assert json.loads(proc.stdout)["errors"] == 1 and len(rows) == 2


def test_a_graph_that_cannot_run_is_a_clear_error(bundle_dir, fmnist, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    graph = broken / manifest["files"]["model"]["path"]
    graph.write_bytes(b"\x08\x07not a graph" * 100)
    manifest["files"]["model"].update(sha256=hashlib.sha256(graph.read_bytes()).hexdigest(),
                                      bytes=graph.stat().st_size)
    for variant in list(manifest.get("variants", {})):
        manifest["files"].pop(manifest["variants"][variant]["file"], None)
    manifest["variants"] = {}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "r.csv"
    proc = bulk(str(listing(tmp_path, photos(fmnist, 2))), "--bundle", str(broken), "--out", str(out))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and not out.exists()


# --- 7. memory -----------------------------------------------------------------------------------------------

PEAK = """
import resource, subprocess, sys
proc = subprocess.run([sys.executable, "-m", "bulk", *sys.argv[1:]], capture_output=True, text=True)
print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(proc.stdout + proc.stderr[-2000:])
"""


def peak_rss(args: list[str]) -> tuple[int, str]:
    """The peak resident set of one bulk run, in bytes, started from a small runner (a child forked from this
    large test process would count its size before exec as its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROMPTKD_", "MALLOC_"))}
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    status, peak = proc.stdout.split("\n", 1)[0].split()
    assert status == "0", proc.stdout[-2000:]
    return int(peak) << 10, proc.stdout.split("\n", 1)[1]


def test_decoding_is_bounded_by_the_memory_budget(bundle_dir, tmp_path):
    """Four 36-megapixel PNGs (100 KB each) on four decoding threads: with a 150 MiB budget they decode one at a
    time, and the peak stays near a small job's plus the budget instead of four images at once."""
    big = tmp_path / "big"
    big.mkdir()
    for i in range(4):
        pixels = np.zeros((6000, 6000, 3), dtype=np.uint8)
        pixels[::97, ::89] = 40 * i
        Image.fromarray(pixels).save(big / f"big{i}.png")
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(small / "small.png")
    common = ["--bundle", str(bundle_dir), "--decode-threads", "4"]
    idle, _ = peak_rss([str(small), *common, "--out", str(tmp_path / "idle.jsonl")])
    unbounded, _ = peak_rss([str(big), *common, "--out", str(tmp_path / "all.jsonl"), "--memory-budget", "4096"])
    bounded, out = peak_rss([str(big), *common, "--out", str(tmp_path / "b.jsonl"), "--memory-budget", "150"])
    print(f"peak: idle {idle >> 20} MiB, 4 GiB budget {unbounded >> 20} MiB, 150 MiB budget {bounded >> 20} MiB")
    assert json.loads(out.splitlines()[0])["errors"] == 0
    assert bounded < idle + (150 << 20) + (96 << 20), "the budget bounds the job's peak"
    assert unbounded - bounded > 200 << 20, "the bound is the budget's doing"
    proc = bulk(str(big), *common, "--out", str(tmp_path / "tiny.jsonl"), "--memory-budget", "50")
    assert proc.returncode == 0 and all("over the memory budget" in row["error"] for row in
                                        read_rows(tmp_path / "tiny.jsonl").values())


def test_the_ledger_records_the_model_and_its_parts(bundle_dir, fmnist, tmp_path):
    out = tmp_path / "r.parquet"
    assert bulk(str(listing(tmp_path, photos(fmnist, 4))), "--bundle", str(bundle_dir), "--out",
                str(out)).returncode == 0
    ledger = json.loads((out / "_bulk.json").read_text())
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert sorted(ledger["committed"]["parts"]) == parts and len(parts) == 1
    assert ParquetWriter(out, Identity(**ledger["identity"])).done == {str(p) for p in photos(fmnist, 4)}


# --- found by a hostile review -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_second_job_on_the_same_results_is_refused_while_the_first_runs(tmp_path, fmt):
    out = tmp_path / f"r.{fmt}"
    first = ParquetWriter(out, IDENTITY) if fmt == "parquet" else LineWriter(out, fmt, IDENTITY)
    first.write(fake_rows(["a"]))
    with pytest.raises(writers.BulkError, match="in use by another bulk job"):
        ParquetWriter(out, IDENTITY) if fmt == "parquet" else LineWriter(out, fmt, IDENTITY)
    first.close()
    again = ParquetWriter(out, IDENTITY) if fmt == "parquet" else LineWriter(out, fmt, IDENTITY)
    assert again.done == {"a"}
    again.close()


@pytest.mark.parametrize("fmt, mine", [("jsonl", '{"note": "do not lose me"}\n'), ("csv", "name,score\nalice,3\n"),
                                       ("jsonl", "")])
def test_a_file_put_in_place_of_bulk_s_results_is_refused_though_its_ledger_remains(tmp_path, fmt, mine):
    out = tmp_path / f"r.{fmt}"
    writer = LineWriter(out, fmt, IDENTITY)
    writer.write(fake_rows([f"img{i}.png" for i in range(50)]))
    writer.close()
    out.write_text(mine)
    if not mine:  # an empty file holds nothing to lose: bulk starts it again
        assert LineWriter(out, fmt, IDENTITY).done == set()
        return
    with pytest.raises(writers.BulkError, match="not|changed"):
        LineWriter(out, fmt, IDENTITY)
    assert out.read_text() == mine


def test_lines_appended_to_bulk_s_results_are_refused_not_cut(tmp_path):
    out = tmp_path / "r.jsonl"
    writer = LineWriter(out, "jsonl", IDENTITY)
    writer.write(fake_rows(["a", "b"]))
    writer.close()
    with out.open("a") as f:
        f.write('{"path": "my-manual-row.png", "owner": "ada"}\n')
    before = out.read_bytes()
    with pytest.raises(writers.BulkError, match="changed since bulk wrote it"):
        LineWriter(out, "jsonl", IDENTITY)
    assert out.read_bytes() == before


def test_a_ledger_save_failing_after_a_part_is_in_place_never_doubles_its_rows(tmp_path, monkeypatch):
    out = tmp_path / "r.parquet"
    writer = ParquetWriter(out, IDENTITY)
    monkeypatch.setattr(ParquetWriter, "PART_ROWS", 3)
    real_save, saves = writers.Ledger.save, []

    def save(self) -> None:
        if self.committed.get("parts") and not self.committed.get("pending") and not saves:  # the save that lists
            saves.append(1)  # the part just renamed into place: once
            raise OSError(28, "No space left on device")
        real_save(self)

    monkeypatch.setattr(writers.Ledger, "save", save)
    with pytest.raises(OSError):
        try:
            writer.write(fake_rows(["a", "b", "c"]))
        finally:
            writer.close()  # as the job's finally does
    monkeypatch.setattr(writers.Ledger, "save", real_save)
    again = ParquetWriter(out, IDENTITY)
    assert again.done == {"a", "b", "c"}
    again.write(fake_rows(["d"]))
    again.close()
    import pyarrow.parquet as pq

    assert sorted(pq.read_table(out).column("path").to_pylist()) == ["a", "b", "c", "d"]


def test_an_interrupt_inside_a_part_write_leaves_a_folder_bulk_resumes(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    out = tmp_path / "r.parquet"
    writer = ParquetWriter(out, IDENTITY)
    monkeypatch.setattr(ParquetWriter, "PART_ROWS", 2)
    real_write = pq.write_table

    def write_table(table, where, *args, **kwargs):
        where.write(b"PAR1 half")  # a part half written when the second signal lands
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", write_table)
    with pytest.raises(KeyboardInterrupt):
        try:
            writer.write(fake_rows(["a", "b"]))
        finally:
            writer.close()
    monkeypatch.setattr(pq, "write_table", real_write)
    again = ParquetWriter(out, IDENTITY)
    assert again.done == set() and not [p for p in out.iterdir() if p.name.endswith(".parquet.tmp")]
    again.close()


@pytest.mark.parametrize("committed", [
    {"parts": {}, "staging": "../victim"}, {"parts": {"../../etc/x.parquet": "0" * 64}}, {"parts": None},
    {"parts": {}, "pending": 5}, {"bytes": "12", "sha256": "0" * 64}, {"bytes": 0, "sha256": "0" * 64, "earlier": [1]},
])
def test_a_tampered_ledger_is_not_bulk_s_and_nothing_is_touched(tmp_path, committed):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    fmt = "parquet" if "parts" in committed else "jsonl"
    out = tmp_path / f"r.{fmt}"
    writer = ParquetWriter(out, IDENTITY) if fmt == "parquet" else LineWriter(out, fmt, IDENTITY)
    writer.write(fake_rows(["a"]))
    writer.close()
    ledger = out / "_bulk.json" if fmt == "parquet" else tmp_path / "r.jsonl.bulk.json"
    raw = json.loads(ledger.read_text())
    raw["committed"] = committed
    ledger.write_text(json.dumps(raw))
    before = snapshot(tmp_path)
    with pytest.raises(writers.BulkError, match="is not bulk's ledger"):
        ParquetWriter(out, IDENTITY) if fmt == "parquet" else LineWriter(out, fmt, IDENTITY)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
def test_the_ledger_is_never_written_through_a_planted_temporary_name(tmp_path, planted):
    precious = tmp_path / "precious.txt"
    precious.write_text("precious")
    for name in (".r.csv.bulk.json.tmp", "._bulk.json.tmp"):
        if planted == "symlink":
            (tmp_path / name).symlink_to(precious)
        else:
            os.mkfifo(tmp_path / name)
    writer = LineWriter(tmp_path / "r.csv", "csv", IDENTITY)  # a FIFO opened for writing would block here
    writer.write(fake_rows(["a"]))
    writer.close()
    assert precious.read_text() == "precious"


def test_list_lines_split_only_at_newlines_and_a_repeated_line_is_one_input(tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_bytes("a.png\r\nodd\x85name\u2028.png\nb.png\na.png\n  c.png  \n".encode())
    assert list_inputs(listed).names == ["a.png", "odd\x85name\u2028.png", "b.png", "c.png"]


def test_a_relative_name_with_a_colon_is_a_file_not_a_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("ab:c.png", "http:x.png"):
        Path(name).write_bytes(b"image bytes")
        assert read_input(name, 100) == b"image bytes"
    with pytest.raises(OSError, match="s3:// is not read here"):
        read_input("s3://bucket/key.png", 100)


def test_a_memory_budget_too_small_for_an_input_is_one_clear_line(bundle_dir, fmnist, tmp_path):
    proc = bulk(str(listing(tmp_path, photos(fmnist, 2))), "--bundle", str(bundle_dir), "--out",
                str(tmp_path / "r.csv"), "--memory-budget", "16")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --memory-budget must be at least 40 MiB"), \
        proc.stderr


def test_another_graph_variant_is_another_answerer(tmp_path):
    out = tmp_path / "r.jsonl"
    LineWriter(out, "jsonl", IDENTITY).close()
    with pytest.raises(writers.BulkError, match="variant 'fp32' -> 'int8'"):
        LineWriter(out, "jsonl", Identity("m", "v1", "l1", "int8", 3, False))
