"""Webhooks: events to tenants' endpoints, signed per the Standard Webhooks spec."""
