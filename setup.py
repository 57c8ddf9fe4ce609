from pathlib import Path

from setuptools import find_packages, setup

# CLIP_benchmark on exported models (docs/evaluation.md). 1.6.2 imports requests without declaring it.
EVAL = ["clip_benchmark>=1.6.2,<1.7", "requests"]

setup(
    name="open_clip_3t",
    version="0.1.0",
    description="Three Towers (3T): contrastive learning with a frozen pretrained third tower, as an OpenCLIP plugin",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["open_clip_3t", "open_clip_3t.*", "training", "training.*"]),
    package_data={"open_clip_3t": ["model_configs/*.json"]},
    python_requires=">=3.9",
    install_requires=[
        "open_clip_torch>=3.3,<3.4",
        "torch>=2.6",  # torch.load defaults to weights_only=True: loaders we do not call ourselves never unpickle code
        "torchvision",
        "timm>=1.0",
        "webdataset>=0.2.5,<=0.2.86",  # open_clip_torch 3.3's pipeline breaks on webdataset 1.x
        "braceexpand",
        "pandas",
        "tabulate",  # pandas' DataFrame.to_markdown (the results tables)
        "safetensors",
        "tqdm",  # progress: the cache build, evaluation
        "huggingface_hub",  # python -m open_clip_3t.publish (HfApi); open_clip_torch needs it too
        "numpy<2.4",  # open_clip_torch 3.3's zero-shot accuracy() breaks on numpy >= 2.4
        "matplotlib",  # the quickstart's and the replication's curves
    ],
    extras_require={
        "eval": EVAL,
        # Hugging Face text towers (text_cfg.hf_model_name, e.g. 3T-roberta-ViT-B-32); checked with transformers 5.24
        "hf": ["transformers"],
        # --report-to tensorboard / wandb (checked before a run starts: a missing one stops it with this extra's name)
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "logging": ["tensorboard", "wandb"],
        # the tests run CLIP_benchmark on an exported model and read a run's TensorBoard event file
        "test": ["pytest", "transformers", "tensorboard", *EVAL],
        "plot": ["matplotlib"],
    },
)
