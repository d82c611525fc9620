"""pytest's hooks and fixtures for tests/. The shared helpers live in attn_testing.py, which
test modules import under that name: tests/integrations has a conftest.py of its own, and
only one module can be imported as `conftest` in a run over the whole tree."""
from attn_testing import (  # noqa: F401  (pytest finds hooks and fixtures by name here)
    nan_poison,
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
)
