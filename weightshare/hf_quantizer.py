"""Loading packed models where users already load models: transformers' ``from_pretrained``.

A packed directory's ``config.json`` carries ``"quantization_config": {"quant_method":
"weightshare"}`` and ``"transformers_weights": "weightshare.safetensors"`` (the shard index
``weightshare.safetensors.index.json`` for a packed file in shards); once
``weightshare`` is imported, this module is registered with transformers'
quantizer registry (``register_quantization_config`` / ``register_quantizer``), as
bitsandbytes, HQQ and torchao are, so that::

    import weightshare
    from transformers import AutoModel
    model = AutoModel.from_pretrained("mini4")            # packed modules on the native kernel
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer("mini4")                      # the same, inside the pipeline

build the same packed modules as ``ws.load``.  The quantizer does the loading
itself before transformers reads any tensor: the packed file is opened and fully
checked (every field, every checksum, the fit of the model), and every entry is
installed into the meta-device model; transformers then finds the plain tensors
it expects.  Loading options are not passed through ``quantization_config=``
(transformers forwards them only for its own config classes): call
``weightshare.modules.set_compute_(model, "bf16")`` afterwards, or use
``ws.load(path, trainable=True)`` for the parametrized form whose tables train.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from weightshare import hub

__all__ = ["WeightshareConfig", "WeightshareHfQuantizer"]

log = logging.getLogger(__name__)


@register_quantization_config(hub.QUANT_METHOD)
class WeightshareConfig(QuantizationConfigMixin):
    """What a packed ``config.json`` says: ``{"quant_method": "weightshare"}`` (the spec is in the packed file)."""

    def __init__(self, quant_method: str = hub.QUANT_METHOD, **kwargs):
        self.quant_method = hub.QUANT_METHOD

    def to_dict(self) -> dict:
        return {"quant_method": self.quant_method}


@register_quantizer(hub.QUANT_METHOD)
class WeightshareHfQuantizer(HfQuantizer):
    """Installs a packed file into the meta-device model that ``from_pretrained`` built."""

    requires_calibration = False  # validate_environment says what to do instead, in weightshare's words

    def validate_environment(self, *args, device_map=None, **kwargs):
        if not self.pre_quantized:
            raise ValueError("weightshare cannot compress a model inside from_pretrained\n"
                             "  compress it first: weightshare compress SRC --bits 4 --out DIR, then load DIR")
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        if any(d not in (None, "cpu") and str(d) != "cpu" for d in devices):
            raise ValueError(f"weightshare's packed layers run on the CPU\n  got: device_map={device_map!r}\n"
                             "  load without a device_map (or device_map='cpu')")

    def update_dtype(self, dtype):
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from weightshare.load import install_checked_
        from weightshare.modules import PackedModule
        from weightshare.pack import FILENAME, PackedFile

        files = sorted(Path(f).resolve() for f in checkpoint_files or [])
        if not files:
            raise ValueError(f"weightshare: transformers found no weights file\n  expected: {FILENAME} or its shards"
                             "\n  load the directory weightshare compress wrote")
        with PackedFile(files[0].parent) as pf:
            # transformers found the files through config.json's transformers_weights: the packed file or its shards
            if files != sorted(f.resolve() for f in pf.files):
                raise ValueError(f"weightshare: a packed model is read from its {FILENAME} (or its shards)\n"
                                 f"  got: {[str(f) for f in files]}\n"
                                 "  load the directory weightshare compress wrote")
            install_checked_(model, pf, own=True)  # from_pretrained's own model: dropped if this raises
        for m in model.modules():
            if isinstance(m, PackedModule):
                m._placeholder = True  # until loading ends: models' _init_weights read .weight
        # ties of weights that are packed modules now (an LM head over its embedding's indices) are kept by the
        # modules themselves: transformers must not look for those parameters
        params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        tied = getattr(model, "all_tied_weights_keys", None)
        if isinstance(tied, dict):
            for target in [t for t, s in tied.items() if t not in params or s not in params]:
                tied.pop(target)
        # the packed file's own tensors (tables, indices) are no parameters of the model
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = ignore | {r"\.__\w+$", r"\.__\w+\."}
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        from weightshare.modules import PackedModule

        for m in model.modules():
            if isinstance(m, PackedModule):
                m._placeholder = False
        return model

    def is_serializable(self):
        return False  # ws.save(model, path) writes a packed directory

    @property
    def is_trainable(self) -> bool:
        return False  # the tables are frozen in packed modules; ws.load(path, trainable=True) trains them
