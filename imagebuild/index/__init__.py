"""Package indexes: the Simple API client the resolver reads."""
