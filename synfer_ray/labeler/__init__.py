"""Pseudo labels: diffusion features, the FERAnno model and ensemble rectification. No Ray here."""
