"""The product-key memory that smf (training/methods/smf.py) and casm (training/methods/casm) both train.

    layer.py    the memory layer (ProductKeyMemory) and its options (MemoryOptions)
    surgery.py  attaching memories to a model's decoder layers, their optimizer group, their checkpoint encoding
    slots.py    TF-IDF slot selection and the passage background it may rank against
    sparse.py   the sparse updater: the top-t slots' rows alone get a gradient and an optimizer step

smf uses one value table per memory; casm one per period over the same keys.
"""

from training.methods.memory.layer import MEMORY_ATTR, MemoryOptions, ProductKeyMemory
from training.methods.memory.slots import read_background, tfidf_top_t
from training.methods.memory.sparse import SparseSlotUpdater
from training.methods.memory.surgery import (
    attach_memories,
    decoder_layers,
    install_mask_hook,
    load_memory_state_dict,
    memory_param_names,
    memory_state_dict,
    resolve_layers,
    value_group,
)

__all__ = [
    "MEMORY_ATTR",
    "MemoryOptions",
    "ProductKeyMemory",
    "SparseSlotUpdater",
    "attach_memories",
    "decoder_layers",
    "install_mask_hook",
    "load_memory_state_dict",
    "memory_param_names",
    "memory_state_dict",
    "read_background",
    "resolve_layers",
    "tfidf_top_t",
    "value_group",
]
