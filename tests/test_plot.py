"""`tinygpt plot`: the loss curves of several runs on one chart, from their metrics.jsonl."""

from conftest import assert_one_line_error, cli, tiny_configs

from tinygpt.plot import loss_figure
from tinygpt.runs import read_metrics
from tinygpt.train import train


def test_plots_several_runs_from_their_metrics(tiny_text_file, tmp_path):
    runs = []
    for name, lr in (("slow", 3e-4), ("fast", 3e-3)):
        m, t = tiny_configs(tiny_text_file, tmp_path / name, max_iters=20, eval_interval=10, learning_rate=lr)
        runs.append(train(m, t, log=lambda *_: None).run_dir)

    fig = loss_figure(runs, bpc=True)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["slow train", "slow val", "fast train", "fast val"]
    assert list(lines[3].get_xdata()) == [0, 10, 20]
    assert list(lines[3].get_ydata()) == [r["val_bpc"] for r in read_metrics(runs[1])]

    png = tmp_path / "both.png"
    r = cli("plot", *runs, "--out", png, "--time")
    assert r.code == 0, r.err
    assert r.out.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000
    assert_one_line_error(cli("plot", tmp_path), "no metrics.jsonl")
