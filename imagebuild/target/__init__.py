"""Targets.

The platform an image is for (tags, markers, libc) and the base image catalog and facts.
"""
