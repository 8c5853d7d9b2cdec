"""Entry point for ``python -m imagebuild``."""

from imagebuild.launch import main

# Guarded: a layer worker process (``pipeline.layerwork``) imports this module again.
if __name__ == "__main__":
    main()
