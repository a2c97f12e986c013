"""Offline data preparation, run by the scripts in scripts/ before training or evaluation: MegaDepth
index reading and pair mining (megadepth), keypoint matching (matching), test-folder building (test_set),
Objaverse object lists (objaverse), procedural objects rendered in the Objaverse layout (render) and
the restricted unpickler for other people's pickles (safe_pickle).

Training and evaluation never import this package at run time, with one exception: the reader of the
original release's ``.pkl`` manifests (``leftrefill.data.manifest.restricted_load``) unpickles them with
``leftrefill.prep.safe_pickle``. What training and evaluation read lives in leftrefill/data/.
"""
