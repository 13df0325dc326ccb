"""The Python side of tch-mix: parity fixtures of swak mixers for ``tch-mix check``, and saving
swak models with the hyper-parameters of their mixers, as tch-mix reads them.

    import tch_mix_tools
    tch_mix_tools.save(model, "model.safetensors")                  # weights + mixer metadata
    tch_mix_tools.export_fixture(model.mix, batch, "mix.safetensors")  # a parity fixture
"""
from .fixture import FORMAT, export_fixture
from .save import add_metadata, metadata, mixer_metadata, read_metadata, save

__all__ = ["FORMAT", "export_fixture", "save", "add_metadata", "read_metadata", "metadata", "mixer_metadata"]
