"""Fractal Atlas: coordinate-based text fields, a shared master kernel and per-book keys,
with a lossless range codec (`constriction`)."""

from ._alphabet import build_alphabet as build_alphabet, from_ids as from_ids, to_ids as to_ids
from ._codec import (
    PRECISION as PRECISION,
    AtlasFormatError as AtlasFormatError,
    decode as decode,
    encode as encode,
    ideal_bits as ideal_bits,
    layout as layout,
    master_hash as master_hash,
    model_counts as model_counts,
    quantise as quantise,
    read_header as read_header,
    step_counts as step_counts,
    stream_key as stream_key,
)
from ._data import Corpus as Corpus, load_books as load_books, synthetic_books as synthetic_books
from ._encoding import (
    FourierFeatures as FourierFeatures,
    HashGrid1D as HashGrid1D,
    collision_count as collision_count,
    grid_resolutions as grid_resolutions,
    hash_index as hash_index,
)
from ._kernel import AtlasKernel as AtlasKernel, iterate as iterate, solve as solve
from ._model import (
    AtlasMaster as AtlasMaster,
    build_master as build_master,
    master_config as master_config,
    master_size as master_size,
    with_iterations as with_iterations,
)
from ._quant import packed_bytes as packed_bytes, round_to_storage as round_to_storage
from ._sample import reconstruct as reconstruct, sample as sample
from ._storage import (
    load_key as load_key,
    load_master as load_master,
    master_bytes as master_bytes,
    save_key as save_key,
    save_master as save_master,
)
from ._train import (
    bits_per_char as bits_per_char,
    fit_key as fit_key,
    make_step as make_step,
    train_master as train_master,
)
