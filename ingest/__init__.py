"""Ingest: the HTTP/JSON and gRPC edge, and the expander that fans jobs out into pointers."""
