"""Measurement: negative log-likelihood (``nll``) and sample quality (``metrics``, ``features``,
``digits_classifier``, ``evaluate``: FID, KID, Inception Score, precision/recall).

Submodules are imported explicitly (``from iddpm.eval.evaluate import evaluate``); this package
imports nothing at load time so that each part stays optional and cheap.
"""
