"""cstwa-dist: distributed CSTWA (post-click CVR estimation) on TorchRec, Ray Data and Faiss."""

__version__ = "0.1.0"
