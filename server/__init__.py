"""gRPC serving for SILO: servicers, auth and the Python client."""
