"""Network: the HTTP pieces every stage shares (transfers, index credentials)."""
