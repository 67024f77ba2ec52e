"""Drivers: how a recipe is run, generic over the grain (`grains`), chosen by the library (`choose`).

    memory     a loaded model: every stage scored, selected and applied in place
    layerwise  a checkpoint swept layer by layer (the model never loaded), streamed export
    files      calibration-free scores from the safetensors files alone, streamed export
    choose     which of them runs a checkpoint folder; `prune_path`
    record     plans made into pruning.json records; stages combined
    inputs     the checks and the calibration windows every driver starts from
"""
