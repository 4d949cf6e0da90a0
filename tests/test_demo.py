from tsbn_kernels import demo


def test_demo_trains_and_backends_agree(capsys):
    assert demo.main(["--steps", "10", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "step   10" in out and "largest per-task loss difference" in out
