"""FastAPI service for text-encoder-free classification with a PromptKD bundle. Never imports torch.

Where things are: `main.py` builds the app (entry point `server.main:app`); protocol/ holds the faces clients
talk to (rest/ and grpc/) over one data plane (protocol/dataplane.py); repository/ the models served and the folders
they come from; loop/ what makes the next version (rollout, drift, capture); runtime/ what runs the graphs
(batcher, decoding, inference sessions). Beside them the settings (config.py) and what every layer shares: the
memory budget, metrics, traces, errors, numbers from outside and the decoding defaults.
"""
