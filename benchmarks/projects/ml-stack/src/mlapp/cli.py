import sys


def main() -> None:
    import torch

    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    print("mlapp", torch.__version__, float((x @ x.T).sum()))
    sys.exit(0)
