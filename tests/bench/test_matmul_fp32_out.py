"""bench/matmul_fp32_out.py runs its whole table on the CPU at toy sizes (the GPU call must not
fail on a scripting error)."""
from bench.matmul_fp32_out import SHAPES, forms, main


def test_table_has_every_shape_and_form(capsys):
    main(["--tokens", "32", "--dim", "16", "--rounds", "1", "--device", "cpu"])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and "x16 ->" in ln]
    assert len(rows) == len(SHAPES) * len(forms())
    for ln in rows:
        assert float(ln.split("|")[3]) > 0, ln
