"""The wire protocols spoken beside the native HTTP API: gRPC (grpc/) for now; each is a thin face over the Service."""
