"""The pipeline.

Composes the stages into a build and a lock; the only package that knows them all.
"""
