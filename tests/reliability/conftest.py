"""The reliability suite shares the worker tests' tiny trained model, settings and reader."""

from tests.worker_support import (  # noqa: F401 (fixtures, found by name)
    model_store,
    one_torch_thread,
    reader,
    settings_for,
    trained,
)
