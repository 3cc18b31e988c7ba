"""The faces clients talk to, each a thin layer over one data plane (dataplane.py: the Service).

rest/ is the HTTP API (the native routes live in main.py; v2.py the Open Inference Protocol, admin.py the admin
routes, middleware.py the admin gate, body limit and request metrics); grpc/ the same protocol over gRPC. Both
share the wire format (open_inference.py), the JSON shapes (schemas.py) and who may call admin routes (auth.py).
"""
