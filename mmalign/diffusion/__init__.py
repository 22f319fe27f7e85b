"""Diffusion-model preference alignment (MaPO, Diffusion-DPO, SFT baseline) on diffusers UNets.

Modules (imported explicitly; this package imports nothing heavy):
``adapter`` (paired denoising errors, references, LoRA, loss functions for the trainer), ``data`` (image pairs,
cached latents/embeddings), ``sampling`` (scheduler-loop sampling), ``pipeline`` (full diffusers pipelines with a
trained UNet: tiny offline Stable Diffusion, generation, pipeline evaluation), ``scorers`` (pixel statistics, CLIP score),
``shapes`` (procedural benchmark images and the tiny UNet), ``train`` (job ``diffusion.train``), ``benchmark``
(job ``diffusion.benchmark``), ``perf`` (MaPO vs Diffusion-DPO cost).
"""
