"""Vision-language alignment: the VLM adapter, Re-Align, BDHS, RRPO and the offline hallucination benchmark.

Modules (import them directly; this package imports nothing heavy):

- ``adapter``: :class:`~mmalign.vision_lm.adapter.VLMAdapter` — encode (prompt, response, images) examples with the
  model's processor, per-token / summed response log-probs, per-branch images in one concatenated forward, image
  tokens hidden from attention (BDHS), several frames, LoRA-disabled reference, generation.
- ``refcache``: reference log-probs precomputed once into safetensors, keyed by a data hash.
- ``objectives``: preference pairs -> batches -> core losses (dpo, ipo, cdpo, robust_dpo, realign, rrpo), online BDHS.
- ``methods``: Re-Align pair builder (image index + masked refilling), BDHS sampling, RRPO phrase alignment.
- ``scenes``, ``tiny``, ``benchmark``: procedural scenes with planted priors, a tiny LLaVA, CHAIR/POPE benchmark.
- ``families``: tiny random-init LLaVA / LLaVA-NeXT / Idefics3 / SmolVLM with offline-built processors.
- ``train``: the ``vlm.train`` job; ``perf``: tokens/s and MFU of DPO steps.
"""
