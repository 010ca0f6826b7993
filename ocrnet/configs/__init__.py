"""OCRNet configs: the published ones (one per row of mmsegmentation's OCRNet table), the
synthetic ones, and their JSON and ``--set`` forms.

    from ocrnet.configs import get_config, list_configs, resolve_config
    cfg = get_config("ocrnet_hr18s_4xb2-40k_cityscapes-512x1024")
    cfg.model.num_classes, cfg.data.total_batch, cfg.schedule.lr
"""

from .io import apply_overrides, config_from_dict, resolve_config
from .published import CONFIGS, get_config, list_configs, register_config
from .schema import (AuxHeadConfig, BackboneConfig, Config, DataConfig, ModelConfig,
                     OCRHeadConfig, Published, ScheduleConfig, TestConfig)
from .synthetic import SYNTHETIC_CONFIGS, synthetic_config, synthetic_data_config

__all__ = ["AuxHeadConfig", "BackboneConfig", "CONFIGS", "Config", "DataConfig",
           "ModelConfig", "OCRHeadConfig", "Published", "SYNTHETIC_CONFIGS", "ScheduleConfig",
           "TestConfig", "apply_overrides", "config_from_dict", "get_config", "list_configs",
           "register_config", "resolve_config", "synthetic_config", "synthetic_data_config"]
