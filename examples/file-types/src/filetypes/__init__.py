"""Name a file's type from its bytes, with libmagic."""
