"""bench/mhc.py --ops site: one mHC site's launches counted (CPU: top-level ATen ops of the
reference), forward below forward+backward."""


def test_site_launches_counts_the_reference_ops():
    from bench.mhc import site_launches

    lines = []
    site_launches(T=16, n=4, D=32, device="cpu", log=lines.append, modes=("reference",))
    row = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert row[0] == "reference" and row[1] == "16x4x32", lines
    n_fwd, n_fb = int(row[2]), int(row[3])
    assert 20 < n_fwd < n_fb, lines   # 20 Sinkhorn iterations alone are > 40 ops
