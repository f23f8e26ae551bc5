"""aufs2overlay: migrate a Docker/balena-engine root from aufs to overlay2, resumably and reversibly."""

__version__ = "0.1.0"
