"""Generated from proto/silo/v1/silo.proto by `python -m silo.server.protogen`."""
