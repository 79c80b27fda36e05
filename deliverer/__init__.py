"""Deliverer: works per-site leases, speaks SMTP, classifies every reply."""
