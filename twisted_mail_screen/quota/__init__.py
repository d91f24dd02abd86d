"""Per-account storage and message-count quotas (RFC 9208; docs/quota.md)."""
