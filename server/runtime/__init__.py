"""What runs the graphs, apart from the models and protocols: decoding (preprocess.py), dynamic batching and the
engine slots (batcher.py), inference sessions on onnxruntime, OpenVINO or TensorRT (sessions/)."""
