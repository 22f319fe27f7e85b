"""mmalign: aligning multimodal and embodied models with human preferences.

Shared preference-learning cores (``mmalign.core``) applied to vision-language models (``mmalign.vision_lm``),
text-to-image diffusion (``mmalign.diffusion``), visuomotor robot rewards and control from simulated human feedback
(``mmalign.robotics``, ``mmalign.envs``). Heavy libraries are imported lazily by the domain adapters.
"""

__version__ = "0.1.0"
