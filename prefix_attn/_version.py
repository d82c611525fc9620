# The one place the version is written: pyproject.toml reads it (dynamic version), and
# prefix_attn.__version__ is this.
__version__ = "0.2.0"
