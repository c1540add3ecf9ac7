"""Integrations with other libraries.

Each submodule imports its library on import, so nothing here is imported by ``import sparse_prefill``:
``sparse_prefill.integrations.transformers`` is loaded on the first call of
:func:`sparse_prefill.enable`, :func:`sparse_prefill.disable` or :func:`sparse_prefill.register`.
"""
