"""A service skeleton whose imports span the lock, so a broken image fails at once."""
