"""dualpseudo: Dual Pseudo Training (You et al., NeurIPS 2023) as one resumable command."""
__version__ = "0.1.0"
