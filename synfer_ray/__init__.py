"""synfer-ray: SynFER synthetic facial-expression data, made and used at cluster scale on Ray."""

__version__ = "0.1.0"
