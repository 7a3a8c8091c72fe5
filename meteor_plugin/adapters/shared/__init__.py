"""What several families share; not a family itself.

    llava_arch.py    the wrappers for models built on LLaVA's ``*_arch.py`` design (the llava package, EAGLE)
    anyres.py        LLaVA-1.6's spatial merges (the llava package's LLaVA-1.6, transformers' LLaVA-NeXT)
    script_edits.py  the edits every family's entry scripts get from ``meteor-plugin patch``
"""
