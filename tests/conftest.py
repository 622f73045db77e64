"""Fixtures shared by every test directory."""
import pytest
from torch.utils._python_dispatch import TorchDispatchMode


class OpNames(TorchDispatchMode):
    """While active, records the aten op of every dispatched call by its base name ("mm",
    "copy_", "zeros"): tests assert which copies, casts or fills a path makes (each one a kernel
    launch on a GPU)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_names():
    """``with op_names() as rec: ...`` then ``rec.names``: the aten ops the block dispatched."""
    return OpNames
