"""The embedded demo (``miu-unlearn demo``) and its toy data, apart from the core.

- :mod:`~miu_hooks.demo.toy_data`: Colored Digits and Colored Fashion
  (:func:`colored_digits`), Colored-MNIST-style data sets with four groups that
  need no download;
- :mod:`~miu_hooks.demo.vit`: the demo's model (:func:`tiny_vit`);
- :mod:`~miu_hooks.demo.pipeline`: :func:`run_demo`, which trains the
  original and the retrained references, then runs MIU through the
  ``miu-unlearn`` pipeline.

Importing this package imports torch and numpy, but not scikit-learn (loaded
when a data set is built) nor click.

Example:
    >>> from miu_hooks.demo import colored_digits, tiny_vit
    >>> splits = colored_digits(seed=0, size=8)
    >>> tiny_vit()(splits.train.inputs[:2]).shape
    torch.Size([2, 2])
"""

from miu_hooks.demo.pipeline import DemoResult, cache_root, run_demo
from miu_hooks.demo.toy_data import ColoredSplits, colored_digits, find_fashion_mnist
from miu_hooks.demo.vit import TinyViT, tiny_vit

__all__ = [
    "ColoredSplits",
    "DemoResult",
    "TinyViT",
    "cache_root",
    "colored_digits",
    "find_fashion_mnist",
    "run_demo",
    "tiny_vit",
]
