"""growlength: GrowLength pretraining (progressively growing sequence length) on DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="growlength",
    version="0.1.0",
    description="Pretrain LLMs on DeepSpeed with progressively growing sequence length (GrowLength).",
    python_requires=">=3.10",
    packages=find_packages(include=["launcher", "launcher.*", "model", "model.*",
                                    "data_pipeline", "data_pipeline.*", "evidence", "evidence.*"]),
    package_data={"launcher": ["configs/*.yaml"]},
    # torch is not pinned here: `make` installs the CPU build pinned in the Makefile (TORCH_SPEC) first,
    # and a GPU user installs their own CUDA build before this package.
    install_requires=[
        "torch>=2.5",  # these two ranges are launcher/versions.py's REQUIRED, checked at start-up
        "deepspeed>=0.19.8,<0.20",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
    ],
    extras_require={
        # transformers: the acceptance run's baseline; ninja, packaging: what flash-attn's build needs. flash-attn itself
        # cannot be an extra (its build imports torch, which pip's isolated build lacks): `make flash-attn`, docs/gpu.md
        "gpu": ["transformers>=4.45", "ninja", "packaging"],
        "mpi": ["mpi4py>=3.1"],
        # data_pipeline: .parquet/.arrow/`datasets` directories (pyarrow) and .zst (zstandard)
        "formats": ["pyarrow>=14", "zstandard>=0.22"],
        "wandb": ["wandb>=0.17"],
        # evidence.downstream: the harness with its Hugging Face backend (transformers, accelerate, peft)
        "eval": ["lm-eval[hf]>=0.4.5,<0.5", "transformers>=4.45"],
        "dev": ["pytest>=8", "hypothesis>=6", "megatron-core==0.16.1", "transformers>=4.45", "mpi4py>=3.1",
                "pyarrow>=14", "zstandard>=0.22", "datasets>=2.16", "wandb>=0.17", "lm-eval[hf]>=0.4.5,<0.5"],
    },
    entry_points={
        "console_scripts": [
            "growlength-train-tokenizer=data_pipeline.train_tokenizer:main",
            "growlength-preprocess=data_pipeline.preprocess:main",
            "growlength-merge=data_pipeline.merge:main",
            "growlength-inspect=data_pipeline.inspect:main",
        ],
    },
)
