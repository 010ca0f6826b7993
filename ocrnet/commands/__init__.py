"""The command line's subcommands, one module each (``ocrnet.commands.<name>``), every one with
``add_parser(sub)`` and ``run(args) -> exit status``; :mod:`ocrnet.commands.errors` is their
one error printer.

:mod:`ocrnet.cli` imports only the module of the command that runs: ``ocrnet configs`` and
``ocrnet convert`` then work without what the others need (OpenCV, the data pipeline).
"""

# Every command and its one-line help, in the order `ocrnet --help` lists them.
HELP = {
    "convert": "convert a mmsegmentation checkpoint to ocrnet format",
    "configs": "list the config names",
    "train": "train a config (iteration-based SGD, poly lr; torchrun for DDP)",
    "test": "evaluate a checkpoint on the val split (mIoU, mAcc, aAcc; torchrun); "
            "--format-only: predictions for the benchmark server",
    "infer": "segment images: colourised masks and overlays as PNG",
    "bench": "fps (batch 1), FLOPs, parameters and peak memory of a config",
    "export": "export a model as ONNX or an AOTInductor package, checked against PyTorch",
    "demo": "train a small OCRNet on the synthetic set on the CPU and evaluate it",
}

__all__ = ["HELP"]
