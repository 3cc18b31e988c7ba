"""The HTTP face: the Open Inference Protocol's routes (v2.py), admin routes (admin.py), the middleware every
request passes (middleware.py) and the OpenAPI statuses each route declares (openapi.py)."""
