"""What a session loads: the verified bytes of a bundle's or backbone's graph (Bundle.graph_bytes,
Backbone.graph_bytes), never the file again by path, so a graph replaced after its check is never run. A path is
still accepted for tools and benchmarks, which load files they made themselves."""
from __future__ import annotations

from pathlib import Path

from bundle import BundleError

# Every reference to external data (weights in files beside the .onnx, for graphs over 2 GB) is a TensorProto
# `external_data` entry whose key is "location"; serialised, that entry starts with these bytes.
EXTERNAL_DATA_KEY = b"\n\x08location"


def graph_label(graph: Path | bytes, name: str | None) -> str:
    """How errors name the graph: `name` (its file, as the caller knows it), else its path."""
    return name or (str(graph) if isinstance(graph, Path) else "the graph")


def refuse_external_data(graph: bytes, label: str) -> None:
    """Given bytes, onnxruntime and OpenVINO look for a graph's external data files relative to the working
    directory: files no manifest lists, so never verified. Export writes every graph as one file (they are far
    under 2 GB); refuse one that is not. The bytes searched for are in every external-data reference, so none is
    missed; a chance match elsewhere (odds about 2^-80 per position) would refuse a valid graph, with this reason."""
    if EXTERNAL_DATA_KEY in graph:
        raise BundleError(f"{label} refers to external data files, which its manifest does not list and the server "
                          "does not load: export the graph as a single file")
