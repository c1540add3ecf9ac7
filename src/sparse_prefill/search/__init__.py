"""Offline, kernel-aware per-head pattern search (``sparse-prefill search``)."""
