"""`tinygpt bench` (written next)."""


def add_bench_args(parser):
    parser.add_argument("--config-name", default="lecture")


def run_bench(args):
    raise NotImplementedError
