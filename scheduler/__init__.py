"""Scheduler: knows the backlog per site and grants deliverers per-site connection leases."""
