"""Generated protobuf and gRPC code for sluice.v1."""
