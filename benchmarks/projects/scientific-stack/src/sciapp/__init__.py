"""A small analysis that imports the whole stack, so a broken image fails at once."""
