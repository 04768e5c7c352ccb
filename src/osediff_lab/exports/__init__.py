"""Exports of a trained generator beyond the LoRA file: a diffusers folder with the LoRA merged in and a standalone
script (``diffusers_folder``), kohya / ComfyUI LoRA files (``kohya``), the model card (``card``) and the Hub upload
(``hub``); ``osediff_lab.export`` is their command line."""
