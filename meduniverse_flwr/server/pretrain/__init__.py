"""Server-side masked image modelling: MAE and SimMIM on unlabeled medical images.

Split by concern, as MAE's own code is: ``models`` (the masks and the MIM models), ``settings``
(what a run is asked to do), ``engine`` (the training loop), ``state`` (the resume state, read as
untrusted), ``__main__`` (the CLI: ``python -m meduniverse_flwr.server.pretrain``). What other modules use is re-exported here.
"""

from meduniverse_flwr.server.pretrain.engine import PretrainResult, build_mim, pretrain
from meduniverse_flwr.server.pretrain.models import MAE, MaskedImageModel, SimMIM, patchify, random_masking, unpatchify
from meduniverse_flwr.server.pretrain.settings import PretrainSettings

__all__ = ["MAE", "MaskedImageModel", "PretrainResult", "PretrainSettings", "SimMIM", "build_mim",
           "patchify", "pretrain", "random_masking", "unpatchify"]
