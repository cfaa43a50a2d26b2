"""Data: the demo world, image folders, splits, captions and the one data-loader factory."""
