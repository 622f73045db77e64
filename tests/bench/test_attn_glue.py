"""bench/attn_glue.py's smoke run on CPU (kernels in the interpreter): every case's new form equals
the old one (fp32) and the table has its rows."""
from bench.attn_glue import main


def test_attn_glue_smoke(capsys):
    main([])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| q") or r.startswith("| kv")
            or r.startswith("| o")]
    assert len(rows) == 3, rows
    for r in rows:
        assert float(r.rstrip(" |").split("|")[-1]) < 1e-5, r
