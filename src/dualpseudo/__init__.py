"""dualpseudo: Dual Pseudo Training (You et al., NeurIPS 2023) as one resumable command.

The Python API (`dualpseudo.api`, loaded on first use): `run`, `load_classifier`, `load_generator`,
`load_images`, `metrics`, `export_run`.
"""
__version__ = "0.1.0"

_API = {"run", "load_classifier", "load_generator", "load_images", "metrics", "Classifier", "Generator"}


def __getattr__(name: str):
    if name in _API:
        from . import api
        return getattr(api, name)
    if name == "export_run":
        from .export import export_run
        return export_run
    raise AttributeError(f"module 'dualpseudo' has no attribute {name!r}")
