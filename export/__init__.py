"""Export: a distilled student becomes a static ONNX image encoder inside a verified model bundle."""
