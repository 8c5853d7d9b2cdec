"""numstats: summary statistics over a bundled CSV, used as an imgbuild example."""
