"""Bases built from Debian packages: archive indexes, package closure, .deb assembly, ELF checks.

Data flow::

    base definition (base-images/*.toml) --archive--> verified Release + Packages
    --closure--> locked .debs (name, version, arch, sha256, URL) --fetch--> .deb files
    --assemble--> deterministic layers + image config (a BaseImage, no daemon, no scripts)

``linkcheck`` reads the ELF files of an image's layers and refuses one whose extension
modules need a library nothing in the image provides.
"""
