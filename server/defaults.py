"""Default decoding limits, shared by the settings (config.py) and the decoder that enforces them
(runtime/preprocess.py). Plain constants, importable without pydantic-settings: the training image decodes with
the server's code (the pipeline's gate) but has no web stack."""

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # what the decoder opens: PROMPTKD_IMAGE_FORMATS
DEFAULT_MAX_PIXELS = 40_000_000  # largest image (width x height) by default: PROMPTKD_MAX_IMAGE_PIXELS
