"""clotho-retrieve: language-based audio retrieval on Clotho (Xiao, Zhu, Guan, Wang, 2023)."""

__version__ = "0.1.0"
