"""Generated from proto/silo/v1/silo.proto by `python -m server.protogen`."""
