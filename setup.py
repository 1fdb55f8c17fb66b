"""pip-installable package of the CALM model repository.

The repository root *is* the package `calm_transformers`: the same `configuration_calm.py`, `modeling_calm.py`
and `generation_calm.py` serve `trust_remote_code` loading from a model folder and `import calm_transformers`.
"""

from setuptools import setup
from setuptools.command.build_py import build_py

# Files at the root that are not part of the installed package.
NOT_PACKAGED = {"setup"}
# What transformers' server needs besides transformers >= 5.25 (its `serving` extra): the tests install these on
# every transformers the project supports, and skip the server's tests where transformers is older.
SERVING = ["openai>=1.98", "pydantic>=2", "fastapi", "starlette", "uvicorn", "rich"]


class BuildPackageFromRoot(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if m[1] not in NOT_PACKAGED]


setup(
    name="calm-transformers",
    version="0.1.0",
    description="CALM (Continuous Autoregressive Language Models) for Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["calm_transformers"],
    package_dir={"calm_transformers": "."},
    # The small CALM trained on Shakespeare's works that `calm-generate` uses by default.
    package_data={"calm_transformers": ["config.json", "calm_tiny_shakespeare/*"]},
    cmdclass={"build_py": BuildPackageFromRoot},
    install_requires=[
        "torch>=2.4,<3",
        "transformers>=4.57,<6",
        "safetensors>=0.4",
        "huggingface_hub>=0.34",
        "tqdm",
    ],
    extras_require={
        "test": [
            *("pytest>=8", "hypothesis>=6", "accelerate>=1.0", "ruff", "tokenizers>=0.19", "tiktoken"),
            *("peft>=0.17", "lm_eval>=0.4.9"),  # the clients tests/test_integrations.py runs CALM with
            *SERVING,  # tests/test_serve.py: calm-serve and the openai client
        ],
        "train": ["accelerate>=1.0", "tokenizers>=0.19"],
        "serve": ["transformers[serving]>=5.25,<6"],
        "plot": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "calm-convert=calm_transformers.convert_checkpoint:main",
            "calm-eval=calm_transformers.evaluate_calm:main",
            "calm-train=calm_transformers.train_calm:main",
            "calm-generate=calm_transformers.cli:main",
            "calm-serve=calm_transformers.serve:main",
        ]
    },
)
