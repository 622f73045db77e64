"""bench/import_graph.py: no import cycle between packages or between the files of one package."""
import importlib.util
from pathlib import Path


def _tool():
    path = Path(__file__).resolve().parents[2] / "bench" / "import_graph.py"
    spec = importlib.util.spec_from_file_location("import_graph", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle_and_model_imports_neither_train_nor_optim(capsys):
    tool = _tool()
    assert tool.main() == 0, capsys.readouterr().out
    edges = tool.module_edges()
    model_targets = {t.split(".")[0] for m, ts in edges.items() if m.startswith("model.") for t in ts}
    assert not model_targets & {"train", "optim", "launch"}, model_targets


def test_a_cycle_is_found():
    tool = _tool()
    assert tool.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
