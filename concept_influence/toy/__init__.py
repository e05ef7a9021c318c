"""A small world to try the library in, with nothing to download: the embedded demo corpus (careful vs reckless
advice, :mod:`.demo_corpus`) and the small-model kit (a byte-level BPE tokenizer, a small TransformerLens model and a
deterministic training loop, :mod:`.small_model`). The demo, the notebooks, the tests and the benchmarks build on it."""

from .demo_corpus import DemoCorpus, make_demo_corpus, make_paired_demo_corpus
from .small_model import SCHEDULES, build_small_model, load_tokenizer, seed_everything, train_bpe_tokenizer, train_model

__all__ = ["DemoCorpus", "make_demo_corpus", "make_paired_demo_corpus", "SCHEDULES", "build_small_model",
           "load_tokenizer", "seed_everything", "train_bpe_tokenizer", "train_model"]
