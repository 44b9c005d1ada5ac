"""glmkit: explore GLM-130B and smaller GLM checkpoints from Jupyter."""
from .config import GLMConfig, KitConfig, load_config
from .generate.blanks import Blank, GenerationResult, TextEvent
from .generate.pipeline import GLMPipeline, load, load_model, load_tokenizer
from .generate.sampling import GenerationSettings
from .tokenizer import GLMTokenizer

__all__ = ["GLMConfig", "KitConfig", "load_config", "Blank", "GenerationResult", "TextEvent", "GLMPipeline",
           "load", "load_model", "load_tokenizer", "GenerationSettings", "GLMTokenizer"]
__version__ = "0.1.0"
