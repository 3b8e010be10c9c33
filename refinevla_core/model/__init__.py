"""The ReFineVLA model: a PaliGemma(2) vision-language model that writes a rationale and 7 action tokens.

    tokenizer.py                 ActionTokenizer: 7-D actions <-> 256 bins per dimension
    configuration_refinevla.py   RefineVLAConfig: base model spec, target order, prompt, token layout
    processor_refinevla.py       image + instruction (+ targets) -> model inputs, labels and loss masks
    modeling_refinevla.py        RefineVLA: the HF PaliGemmaForConditionalGeneration plus constrained decoding
    backbone.py                  the offline tokenizer, PaliGemmaProcessor and PaliGemmaConfig of random-init sizes
    presets.py                   tiny / mid random-init models built offline; real-size PaliGemma2 presets
    checkpoint_format.py         the folder format both families share: manifest (sizes, sha256) written last, verify
    checkpoint_refinevla.py      writing a RefineVLA folder (RefineVLA.from_pretrained reads it)
    checkpoint.py                save_checkpoint / load_checkpoint for both families: one HF-style folder, safetensors
    adapters.py                  opt-in SpatialVLA / OpenVLA policies (trust_remote_code), same Policy interface

Importing this package stays light (no torch); import the submodules you need.
"""
