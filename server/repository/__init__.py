"""The models served: the folders they come from (layout.py, Triton's model repository), the loaded versions
(served.py, models.py), which version answers a request (routing.py), shared backbones (backbones.py) and the
head every version ranks with (classifier.py)."""
