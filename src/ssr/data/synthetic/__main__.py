"""`python -m ssr.data.synthetic OUT [--seed 0] [--num-source 200] ... [--benchmarks ...]`."""

from ssr.data.synthetic.writer import main

if __name__ == "__main__":
    raise SystemExit(main())
