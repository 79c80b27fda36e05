"""Sluice's shared package: config, NATS names and layout, generated protobuf code, the CLI."""

__version__ = "0.1.0"
