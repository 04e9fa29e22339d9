"""Global-model persistor: FLARE's ``PTFileModelPersistor`` with the seeded initial FUSS model.

The initial global model is ``fuss_components.site.init_global_state(cfg)`` loaded into
``fuss_components.site.build_model(cfg)`` (the same start as the in-process runner), so ``FL_global_model.pt``
(every round) and ``FL_best_global_model.pt`` (best validation mIoU) are plain torch checkpoints
``{"model": {"head.*": Tensor, "centroids": Tensor}, ...}`` that load with ``torch.load(weights_only=True)``.
Tensors stay tensors end to end (no numpy conversion).
"""

from __future__ import annotations

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from fuss_flare import CONFIG_FILE, load_job_config


class FussModelPersistor(PTFileModelPersistor):
    def __init__(
        self,
        config_file: str = CONFIG_FILE,
        global_model_file_name: str = "FL_global_model.pt",
        best_global_model_file_name: str = "FL_best_global_model.pt",
        source_ckpt_file_full_name: str | None = None,
    ):
        """Args:
        config_file: the job's FussConfig JSON (the app's config folder).
        global_model_file_name / best_global_model_file_name: file names in the server app folder.
        source_ckpt_file_full_name: a checkpoint to start from instead of the seeded initial model (a resumed job:
            its ``fuss_checkpoint.pt``).
        """
        super().__init__(
            global_model_file_name=global_model_file_name,
            best_global_model_file_name=best_global_model_file_name,
            source_ckpt_file_full_name=source_ckpt_file_full_name,
            allow_numpy_conversion=False,
            load_device="cpu",
        )
        self.config_file = config_file

    def handle_event(self, event: str, fl_ctx: FLContext):
        if event == EventType.START_RUN and self.model is None:
            from fuss_components.site import build_model, init_global_state

            cfg = load_job_config(fl_ctx, self.config_file)
            model = build_model(cfg)
            model.load_state_dict(init_global_state(cfg))
            self.model = model
        super().handle_event(event, fl_ctx)
