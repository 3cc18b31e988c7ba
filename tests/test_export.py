"""Export refuses to publish a graph that fails parity, and never clobbers an existing bundle by accident."""
import pytest

import export.build as export_build
import export.cli as export_cli
from bundle import BundleError, Parity, read_bundle
from export.parity import ParityError
from training.data.datasets import find_images


def test_parity_failure_writes_nothing(distilled, fmnist, tmp_path, monkeypatch):
    bad = Parity(images=4, min_cosine=0.98, mean_cosine=0.99, top1_agreement=0.75, max_abs_diff=0.1)
    monkeypatch.setattr(export_build, "measure", lambda *a, **k: (bad, None))
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match="min cosine 0.980000"):
        export_build.build_bundle(distilled, out, find_images(fmnist / "test")[:4])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind


def test_existing_bundle_is_kept_unless_overwrite(distilled, fmnist, tmp_path, bundle_dir):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    images = find_images(fmnist / "test")[:4]
    with pytest.raises(BundleError, match="--overwrite"):
        export_build.build_bundle(distilled, out, images)
    assert (out / "precious.txt").read_text() == "keep me"
    export_build.build_bundle(distilled, out, images, overwrite=True)
    assert read_bundle(out).manifest.parity.images == 4
    assert not (out / "precious.txt").exists()


def test_cli_reports_errors_cleanly(tmp_path, capsys, fmnist):
    code = export_cli.main(["--checkpoint", str(tmp_path / "nope.pt"), "--parity-images", str(fmnist / "test"),
                            "--out", str(tmp_path / "b")])
    assert code == 2
    assert "cannot read student checkpoint" in capsys.readouterr().err


def test_one_entry_dispatches_to_every_export_tool():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]

    def run(*args):
        return subprocess.run([sys.executable, "-m", "export", *args], cwd=repo, capture_output=True, text=True,
                              timeout=120)

    listing = run("--help")
    assert listing.returncode == 0 and all(name in listing.stdout for name in ("bundle", "trt", "vocabulary"))
    assert run().returncode == 2
    unknown = run("bogus")
    assert unknown.returncode == 2 and "unknown command 'bogus'" in unknown.stderr
    for command, prog in (("bundle", "python -m export bundle"), ("trt", "python export/to_trt.py"),
                          ("vocabulary", "python -m export vocabulary")):
        usage = run(command, "--help")
        assert usage.returncode == 0 and usage.stdout.startswith(f"usage: {prog}"), usage.stderr
    missing = run("bundle", "--checkpoint", "/nonexistent/student.pt", "--parity-images", "/nonexistent",
                  "--out", "/tmp/never-written")
    assert missing.returncode == 2 and missing.stderr.startswith("error:")
